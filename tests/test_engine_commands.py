"""corrupt and split with --engine ray (a local Ray with 2 CPUs) equal the one-process run: the same bytes
for CSV and JSONL, the same Parquet (data, row groups, schema and provenance but its two clock fields), the
same --json summary but its timings, the same errors; on synthetic and real data, ids repeated or shared."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

import prefnoise as pn
from prefnoise.api.tables import InputTable
from prefnoise.data.provenance import METADATA_KEY
from prefnoise.engine import RAY_MISSING
from prefnoise.errors import PrefnoiseError
from tests.cli_helpers import assert_one_line_error, invoke
from tests.conftest import ROOT, SAMPLE, make_pairs
from tests.ray_helpers import ray_installed, ray_test

pytestmark = pytest.mark.xdist_group("ray")  # the whole module on the worker holding the one local Ray

REAL = ROOT.parent / "shared" / "data" / "real"
ULTRAFEEDBACK = REAL / "ultrafeedback-binarized-cleaned-1k.jsonl.gz"
HH = REAL / "hh-rlhf-harmless-base-test.jsonl.gz"
TIMING = ("seconds", "rows_per_second")
CLOCK = ("time", "duration_s")


@pytest.fixture
def small_batches(monkeypatch):
    """Inputs read in blocks of 97 rows (the reader's 16,384 would make every test table one block)."""
    batches = InputTable.batches

    def in_small_blocks(self):
        for frame in batches(self):
            yield from (frame.slice(start, 97) for start in range(0, frame.height, 97))

    monkeypatch.setattr(InputTable, "batches", in_small_blocks)


def _parquet_view(path: Path) -> tuple:
    """A Parquet file's content, row groups, schema and provenance without its clock fields."""
    meta = pq.ParquetFile(path).metadata
    table = pq.read_table(path)
    provenance = json.loads(meta.metadata[METADATA_KEY])
    for entry in provenance["history"]:
        for key in CLOCK:
            entry.pop(key, None)
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return table.replace_schema_metadata(None), groups, table.schema.remove_metadata(), provenance


def assert_same_output(local: Path, ray: Path) -> None:
    """``ray`` equals ``local``: byte for byte for CSV/JSONL; for Parquet all but the run's clock fields."""
    if local.suffix in (".csv", ".jsonl"):
        assert ray.read_bytes() == local.read_bytes()
        return
    got, want = _parquet_view(ray), _parquet_view(local)
    assert got[0].equals(want[0]) and got[1:] == want[1:]


def assert_same_summary(local: dict, ray: dict) -> None:
    """The --json summaries agree but for their timings and the output's name."""
    drop = (*TIMING, "output")
    assert {k: v for k, v in ray.items() if k not in drop} == {k: v for k, v in local.items() if k not in drop}


def _corrupt_both(data, tmp_path: Path, suffix: str, **options) -> tuple[dict, dict]:
    local, ray = tmp_path / f"local{suffix}", tmp_path / f"ray{suffix}"
    want = pn.corrupt(data, local, **options).summary
    got = pn.corrupt(data, ray, engine="ray", **options).summary
    assert_same_output(local, ray)
    assert_same_summary(want, got)
    return want, got


@ray_test
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_corrupt_on_ray_writes_the_local_engines_output(ray_cluster, small_batches, tmp_path, suffix):
    data = tmp_path / "pairs.parquet"
    pl.read_parquet(SAMPLE).drop("chosen_features", "rejected_features").write_parquet(data)
    want, _ = _corrupt_both(data, tmp_path, suffix, rate=0.3, seed=5)
    assert want["rows"] == 400 and 80 < want["flips"] < 160


@ray_test
@pytest.mark.parametrize(
    "options",
    [
        {"noise": "asymmetric", "rate_pos": 0.4, "rate_neg": 0.1, "exact": True},  # two passes: global thresholds
        {"noise": "symmetric", "rate": 0.25, "exact": True},
        {"noise": "bt", "temperature": 0.5, "drop_invalid": True},  # dropped counts merged in order
        {"noise": "uniform", "max_rate": 0.4},
    ],
)
def test_every_noise_model_on_ray_equals_the_local_engine(ray_cluster, small_batches, tmp_path, options):
    frame = make_pairs(450, seed=3)
    scores = frame["chosen_score"].to_numpy().copy()
    scores[[10, 200, 301]] = np.nan  # blocks 0, 2 and 3 each drop a pair with --drop-invalid
    frame = frame.with_columns(pl.Series("chosen_score", scores))
    if options["noise"] != "bt":
        frame = frame.drop("chosen_score", "rejected_score")
    data = tmp_path / "pairs.parquet"
    frame.write_parquet(data)
    want, _ = _corrupt_both(data, tmp_path, ".jsonl", seed=11, **options)
    if options.get("exact"):
        rates = {"all": options.get("rate"), "positive": options.get("rate_pos"), "negative": options.get("rate_neg")}
        for name, group in want["groups"].items():
            assert group["flips"] == round(rates[name] * group["rows"])
    if options["noise"] == "bt":
        assert want["dropped"] == {"null or non-finite 'chosen_score'": 3} and want["rows"] == 447


@ray_test
def test_repeated_pairs_flip_together_on_ray_and_shared_ids_fail_as_locally(ray_cluster, small_batches, tmp_path):
    frame = make_pairs(150, seed=8)
    repeated = pl.concat([frame, frame.slice(0, 60), frame.slice(100, 50)])  # ids repeat across blocks
    data = tmp_path / "repeated.jsonl"
    repeated.write_ndjson(data)
    _corrupt_both(data, tmp_path, ".jsonl", rate=0.3, seed=2)
    flipped = pl.read_ndjson(tmp_path / "ray.jsonl").group_by("pair_id").agg(pl.col("flipped").n_unique())
    assert flipped["flipped"].max() == 1  # every copy of a pair flipped the same way
    shared = repeated.with_columns(pl.lit("same id").alias("pair_id"))
    bad = tmp_path / "shared.parquet"
    shared.write_parquet(bad)
    messages = []
    for engine in ("local", "ray"):
        with pytest.raises(PrefnoiseError) as caught:
            pn.corrupt(bad, tmp_path / f"shared-{engine}.parquet", rate=0.3, engine=engine)
        messages.append(caught.value.message)
        assert not (tmp_path / f"shared-{engine}.parquet").exists()
    assert messages[0] == messages[1] and "pair_id 'same id' is shared by rows with different content" in messages[0]


@ray_test
def test_a_bad_row_in_a_later_block_is_named_as_the_local_engine_names_it(ray_cluster, small_batches, tmp_path):
    frame = make_pairs(300, seed=4)
    scores = frame["rejected_score"].to_numpy().copy()
    scores[[150, 250]] = np.inf  # rows 151 and 251: the second and third blocks
    data = tmp_path / "pairs.parquet"
    frame.with_columns(pl.Series("rejected_score", scores)).write_parquet(data)
    messages = []
    for engine in ("local", "ray"):
        with pytest.raises(PrefnoiseError) as caught:
            pn.corrupt(data, tmp_path / f"{engine}.parquet", noise="bt", engine=engine)
        messages.append(caught.value.message)
    assert messages[0] == messages[1] and "'rejected_score' is inf at row 151" in messages[0]


@ray_test
def test_split_on_ray_writes_the_local_engines_sides(ray_cluster, tmp_path):
    frame = make_pairs(700, seed=6)
    frame = pl.concat([frame, frame.slice(0, 100).with_columns(pl.col("chosen") + " again")])  # prompts repeat
    data = tmp_path / "pairs.parquet"
    frame.write_parquet(data)
    for by, suffix in (("prompt", ".parquet"), ("pair", ".jsonl")):
        local = pn.split(data, tmp_path / f"lt-{by}{suffix}", tmp_path / f"le-{by}{suffix}", by=by, seed=3,
                         test_fraction=0.3)
        ray = pn.split(data, tmp_path / f"rt-{by}{suffix}", tmp_path / f"re-{by}{suffix}", by=by, seed=3,
                       test_fraction=0.3, engine="ray")
        for side in ("t", "e"):
            assert_same_output(tmp_path / f"l{side}-{by}{suffix}", tmp_path / f"r{side}-{by}{suffix}")
        assert ray.train.equals(local.train) and ray.test.equals(local.test)
        assert {k: v for k, v in ray.summary.items() if k not in ("train", "test")} == {
            k: v for k, v in local.summary.items() if k not in ("train", "test")
        }
        assert local.summary["shared_prompts"] == 0 if by == "prompt" else True
    from prefnoise.engine.split import split_on_ray  # many blocks: the masks are gathered in order

    canonical = pn.as_polars(frame)
    train, test = split_on_ray(ray_cluster, canonical, test_fraction=0.3, by="prompt", seed=3, block_rows=61)
    want = pn.split_table(canonical, test_fraction=0.3, by="prompt", seed=3)
    assert train.equals(want[0]) and test.equals(want[1]) and test.height > 150


# --------------------------------------------------------------------------- real data, through the CLI


def _cli_json(*args) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # stdout holds the JSON object alone (Ray prints nothing there)


def _real(path: Path) -> Path:
    if not path.exists():
        pytest.skip("shared/data/real is not beside this checkout")
    return path


@ray_test
def test_corrupt_on_ray_equals_local_on_real_ultrafeedback_and_hh(ray_cluster, small_batches, tmp_path):
    runs = [
        (_real(ULTRAFEEDBACK), ".parquet",
         ["--noise", "bt", "--temperature", "0.5", "--chosen-score-col", "metadata.rating_chosen",
          "--rejected-score-col", "metadata.rating_rejected", "--drop-invalid"]),
        (_real(HH), ".jsonl", ["--layout", "hh", "--rate", "0.2", "--exact", "--drop-invalid"]),
    ]
    for data, suffix, flags in runs:
        local, ray = tmp_path / f"{data.name}-local{suffix}", tmp_path / f"{data.name}-ray{suffix}"
        want = _cli_json("corrupt", data, local, *flags)
        got = _cli_json("corrupt", data, ray, *flags, "--engine", "ray")
        assert_same_output(local, ray)
        assert_same_summary(want, got)
        assert want["rows"] > 900 and want["flips"] > 50


@ray_test
def test_split_on_ray_equals_local_on_real_ultrafeedback(ray_cluster, tmp_path):
    data = _real(ULTRAFEEDBACK)
    flags = ("--test-fraction", "0.25", "--drop-invalid")
    want = _cli_json("split", data, tmp_path / "lt.jsonl", tmp_path / "le.jsonl", *flags)
    got = _cli_json("split", data, tmp_path / "rt.jsonl", tmp_path / "re.jsonl", *flags, "--engine", "ray")
    for a, b in (("lt", "rt"), ("le", "re")):
        assert (tmp_path / f"{a}.jsonl").read_bytes() == (tmp_path / f"{b}.jsonl").read_bytes()
    assert got["test"]["rows"] == want["test"]["rows"] > 150 and got["rows"] == want["rows"] == 999


# --------------------------------------------------------------------------- URIs and errors


@ray_test
def test_corrupt_on_ray_reads_and_writes_filesystem_uris(ray_cluster, tmp_path, mem_bucket):
    bucket = mem_bucket
    make_pairs(120, seed=1).write_parquet(bucket / "in.parquet")
    local = pn.corrupt(bucket / "in.parquet", tmp_path / "local.csv", rate=0.2).summary
    remote = pn.corrupt("mem://in.parquet", "mem://out/noisy.csv", rate=0.2, engine="ray").summary
    assert (bucket / "out" / "noisy.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
    assert remote["input"] == "mem://in.parquet" and remote["output"] == "mem://out/noisy.csv"
    assert remote["flips"] == local["flips"]
    via_file = pn.corrupt(f"file://{bucket / 'in.parquet'}", tmp_path / "f.csv", rate=0.2, engine="ray").summary
    assert via_file["flips"] == local["flips"]
    with pytest.raises(PrefnoiseError, match="exists; JSON lines and CSV files carry no provenance"):
        pn.corrupt("mem://in.parquet", "mem://out/noisy.csv", rate=0.2, engine="ray", overwrite=True)


@ray_test
def test_overwrite_replaces_a_remote_output_only_when_prefnoise_wrote_it(ray_cluster, mem_bucket):
    bucket = mem_bucket
    make_pairs(60, seed=2).write_parquet(bucket / "in.parquet")
    corrupt = ("corrupt", "mem://in.parquet", "mem://noisy.parquet", "--rate", "0.2", "--engine", "ray")
    assert invoke(*corrupt).exit_code == 0
    first = (bucket / "noisy.parquet").read_bytes()
    assert_one_line_error(invoke(*corrupt, "--seed", "1"), "OUT mem://noisy.parquet: exists (an earlier prefnoise "
                          "output); pass --overwrite to replace it")
    assert invoke(*corrupt, "--seed", "1", "--overwrite").exit_code == 0  # its own earlier output: replaced
    assert (bucket / "noisy.parquet").read_bytes() != first
    pq.write_table(pq.read_table(bucket / "in.parquet").replace_schema_metadata(None), bucket / "noisy.parquet")
    theirs = (bucket / "noisy.parquet").read_bytes()  # the same kind of file, without prefnoise's provenance
    assert_one_line_error(invoke(*corrupt, "--overwrite"), "OUT mem://noisy.parquet: exists and was not written by "
                          "prefnoise, which never replaces such files; give another name")
    assert (bucket / "noisy.parquet").read_bytes() == theirs
    assert sorted(p.name for p in bucket.iterdir()) == ["in.parquet", "noisy.parquet"]  # no temporary left


def test_engine_flags_are_checked_before_any_work(tmp_path):
    result = invoke("corrupt", SAMPLE, tmp_path / "o.parquet", "--rate", "0.2", "--workers", "2")
    assert_one_line_error(result, "--workers applies to --engine=ray only")
    result = invoke("split", SAMPLE, tmp_path / "a.parquet", tmp_path / "b.parquet", "--engine", "spark")
    assert_one_line_error(result, "--engine must be one of: local, ray; got 'spark'")
    assert not any(tmp_path.iterdir())


NEEDS_RAY = ("a filesystem URI is read and written with --engine ray only (docs/distributed.md); add --engine ray "
             "or give a local path")


def test_uris_need_the_ray_engine_and_models_and_figures_stay_local(tmp_path):
    uri = (tmp_path / "pairs.parquet").as_uri()  # file:// too: every URI is the Ray engine's
    for args, line in [
        (("corrupt", uri, tmp_path / "o.parquet", "--rate", "0.2"), f"DATA {uri}: {NEEDS_RAY}"),
        (("split", SAMPLE, tmp_path / "a.parquet", "s3://b/t.parquet"), f"TEST s3://b/t.parquet: {NEEDS_RAY}"),
        (("score", tmp_path / "rm", uri, tmp_path / "s.parquet"), f"DATA {uri}: {NEEDS_RAY}"),
        (("score", tmp_path / "rm", SAMPLE, "s3://b/s.parquet"), f"OUT s3://b/s.parquet: {NEEDS_RAY}"),
        (("rank-check", "s3://b/scored.parquet"), f"DATA s3://b/scored.parquet: {NEEDS_RAY}"),
        (("audit", uri, "--out", tmp_path / "a.jsonl"), f"DATA {uri}: {NEEDS_RAY}"),
        (("audit", SAMPLE, "--out", "gs://b/a.jsonl"), f"--out gs://b/a.jsonl: {NEEDS_RAY}"),
        (("score", "s3://b/rm", SAMPLE, tmp_path / "s.parquet", "--engine", "ray"),
         "MODEL s3://b/rm: a filesystem URI; model directories are local paths, with --engine ray too (on every "
         "node: docs/distributed.md), copy it to this machine"),
        (("rank-check", SAMPLE, "--plot", "s3://b/f.png", "--engine", "ray"),
         "--plot s3://b/f.png: a filesystem URI; this path is local even with --engine ray (docs/distributed.md), "
         "give a local path"),
    ]:
        if "--engine" in args and not ray_installed():
            continue
        assert_one_line_error(invoke(*args), line)
    assert not any(tmp_path.iterdir()) and not Path("s3:").exists()  # nothing written, no 's3:' directory


@ray_test
def test_a_remote_output_never_names_the_input_or_the_other_output(mem_bucket):
    if not ray_installed():
        pytest.skip("ray[data] is not installed (pip install 'prefnoise[ray]')")
    (mem_bucket / "b").mkdir()
    make_pairs(20, seed=1).write_parquet(mem_bucket / "b" / "in.parquet")
    before = (mem_bucket / "b" / "in.parquet").read_bytes()
    with pytest.raises(PrefnoiseError, match=r"^OUT mem://b/x/../in.parquet: is the input mem://b/in.parquet; "
                       "prefnoise never writes over an input"):  # checked before Ray starts: no cluster here
        pn.corrupt("mem://b/in.parquet", "mem://b/x/../in.parquet", rate=0.2, engine="ray", overwrite=True)
    with pytest.raises(PrefnoiseError, match="^TRAIN and TEST name the same file; give each its own$"):
        pn.split("mem://b/in.parquet", "mem://b/t.parquet", "mem://b//t.parquet", engine="ray")
    assert (mem_bucket / "b" / "in.parquet").read_bytes() == before and len(list(mem_bucket.rglob("*"))) == 2


_JOIN = """
import sys
import ray
import prefnoise as pn
from prefnoise.engine import ray_session
from prefnoise.options import EngineOptions

address, data, out = sys.argv[1:]
with ray_session(EngineOptions(engine="ray", ray_address=address)) as session:  # joins; pn.corrupt reuses it
    where = ray.get(ray.remote(lambda: __import__("prefnoise").__file__).remote())
    flips = pn.corrupt(data, out, rate=0.3, seed=4, engine="ray", ray_address=address).summary["flips"]
    print(where, session.workers, session.started, flips)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@ray_test
@pytest.mark.fresh_ray  # its own Ray cluster (20-40 s): `pytest -m fresh_ray`, not in the default run
def test_ray_address_joins_a_running_cluster_and_its_workers_run_this_checkout(tmp_path):
    """A head node started with the ray CLI (its own port and temp dir); a driver in a subprocess (not this
    process's Ray) joins it by --ray-address. The head's environment lacks PYTHONPATH: the workers import
    prefnoise from this checkout only through the driver's runtime_env. The head is stopped through its own
    process (``ray start --block`` ends its processes on SIGTERM), never ``ray stop``, which would stop every
    Ray on the machine, the session's included."""
    if not ray_installed():
        pytest.skip("ray[data] is not installed (pip install 'prefnoise[ray]')")
    data = tmp_path / "pairs.jsonl"
    make_pairs(300, seed=9).write_ndjson(data)
    want = pn.corrupt(data, tmp_path / "local.jsonl", rate=0.3, seed=4).summary["flips"]
    port, temp = _free_port(), tempfile.mkdtemp(prefix="pnray-")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"  # recent Ray turns token authentication on for `ray start` clusters
    log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--num-cpus", "1", "--port", str(port),
         "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp, "--block"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},  # SIGTERM: stop at once, no 30 s drain
    )
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (tmp_path / "head.log").read_text() and head.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()
            time.sleep(0.5)
        assert head.poll() is None, (tmp_path / "head.log").read_text()
        done = subprocess.run(
            [sys.executable, "-c", _JOIN, f"127.0.0.1:{port}", str(data), str(tmp_path / "joined.jsonl")],
            capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=300,
            cwd=tmp_path,  # Ray puts the driver's directory on its workers' path: not this checkout's root
        )
        assert done.returncode == 0, done.stderr
        where, workers, started, flips = done.stdout.split()
        assert Path(where) == ROOT / "prefnoise" / "__init__.py"  # this checkout, not another install
        assert (workers, started, int(flips)) == ("1", "True", want)  # the joined cluster's one CPU
        assert (tmp_path / "joined.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
    finally:
        head.terminate()  # the head's own processes only
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


_CLI_WITHOUT_RAY = """
import sys
sys.modules["ray"] = None  # import ray raises ImportError, as where the extra is not installed
from prefnoise.__main__ import run
sys.argv = ["prefnoise", *sys.argv[1:]]
run()
"""


def test_engine_ray_without_ray_exits_2_naming_the_extra(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["corrupt", str(SAMPLE), str(tmp_path / "o.parquet"), "--rate", "0.2", "--engine", "ray"],
                 ["split", str(SAMPLE), str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"), "--engine", "ray"]):
        done = subprocess.run([sys.executable, "-c", _CLI_WITHOUT_RAY, *args], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr == f"Error: {RAY_MISSING}\n"
    assert not any(tmp_path.iterdir())
