"""Issue "Inputs": hub dataset ids and hub-layout directories, read offline (--split, --config).

Every test points the Hugging Face caches at temporary directories and makes any network
connection an error, so these tests prove nothing is downloaded or even looked up."""

from __future__ import annotations

import json
import shutil
import socket

import polars as pl
import pytest

from prefnoise.data import open_source, read_history
from prefnoise.errors import PrefnoiseError
from tests.cli_helpers import assert_nothing_written, assert_one_line_error, invoke
from tests.conftest import make_pairs

datasets = pytest.importorskip("datasets")
hub_constants = pytest.importorskip("huggingface_hub.constants")


@pytest.fixture(autouse=True)
def offline_caches(tmp_path, monkeypatch):
    """Empty HF caches under tmp_path, and no network: a connection attempt fails the test."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")

    def no_network(*args, **kwargs):
        raise AssertionError("prefnoise tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return home


def _hub_dir(root, *, readme: str | None = None):
    """A directory laid out like a hub repository: data/train-* (30 pairs) and data/test-* (10)."""
    (root / "data").mkdir(parents=True)
    make_pairs(30, seed=1).write_parquet(root / "data" / "train-00000-of-00001.parquet")
    make_pairs(10, seed=2).write_parquet(root / "data" / "test-00000-of-00001.parquet")
    if readme is not None:
        (root / "README.md").write_text(readme, encoding="utf-8")
    return root


TWO_CONFIGS = """---
configs:
- config_name: small
  data_files:
  - split: train
    path: small/*.jsonl
- config_name: full
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
---
# a dataset card
"""


def test_hub_layout_directory_needs_a_split_when_it_has_several(tmp_path):
    repo = _hub_dir(tmp_path / "repo")
    out = tmp_path / "out.parquet"
    assert_one_line_error(invoke("corrupt", repo, out, "--rate", "0.1"), "has splits train, test", "--split NAME")
    assert_nothing_written(out)
    assert_one_line_error(
        invoke("corrupt", repo, out, "--rate", "0.1", "--split", "dev"), "no split 'dev'; splits are: train, test"
    )
    result = invoke("corrupt", repo, out, "--rate", "0.1", "--split", "test", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 10
    step = read_history(out)[-1]["input"]
    assert (step["split"], step["config"], step["rows"]) == ("test", "default", 10)
    assert step["fingerprint"].startswith("blake2b-parquet-footer:")


def test_readme_configs_pick_files_and_config(tmp_path):
    repo = _hub_dir(tmp_path / "repo", readme=TWO_CONFIGS)
    (repo / "small").mkdir()
    make_pairs(5, seed=3).write_ndjson(repo / "small" / "part.jsonl")
    assert_one_line_error(
        invoke("inspect", repo, "--json"), "has configs small, full", "pass --config NAME"
    )
    small = open_source(repo, config="small")  # one split: no --split needed
    assert (small.format, small.split, small.collect().height) == ("json", "train", 5)
    full = open_source(repo, config="full", split="train")
    assert (full.format, full.collect().height) == ("parquet", 30)
    with pytest.raises(PrefnoiseError, match=r"repo \(config 'full'\): has splits train, test; pass --split"):
        open_source(repo, config="full")
    with pytest.raises(PrefnoiseError, match="no config 'tiny'; configs are: small, full"):
        open_source(repo, config="tiny")


def test_a_default_config_is_used_without_config(tmp_path):
    readme = TWO_CONFIGS.replace("- config_name: full\n", "- config_name: full\n  default: true\n")
    repo = _hub_dir(tmp_path / "repo", readme=readme)
    (repo / "small").mkdir()
    make_pairs(5, seed=3).write_ndjson(repo / "small" / "part.jsonl")
    assert open_source(repo, split="test").collect().height == 10


def _fake_snapshot(home, repo_id, source):
    """A hub-cache entry as huggingface_hub leaves it: blobs/, snapshots/<sha>/ links, refs/main."""
    entry = home / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (entry / "blobs").mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(sha)
    for number, file in enumerate(sorted(p for p in source.rglob("*") if p.is_file())):
        blob = entry / "blobs" / f"blob{number}"
        shutil.copyfile(file, blob)
        link = entry / "snapshots" / sha / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    return entry


def test_a_hub_id_reads_from_the_hub_cache(tmp_path, offline_caches):
    _fake_snapshot(offline_caches, "org/prefs", _hub_dir(tmp_path / "src"))
    out = tmp_path / "out.parquet"
    result = invoke("corrupt", "org/prefs", out, "--rate", "0.2", "--split", "train", "--json")
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(out).height == 30
    step = read_history(out)[-1]["input"]
    assert (step["path"], step["split"]) == ("org/prefs", "train")


def test_a_hub_id_reads_from_the_datasets_cache(tmp_path, offline_caches):
    """A dataset loaded once with datasets.load_dataset, then read offline by its id."""
    repo = _hub_dir(tmp_path / "repo")
    datasets.disable_progress_bars()
    loaded = datasets.load_dataset(str(repo), split="test")
    prepared = next(iter(loaded.cache_files))["filename"]
    config_dir = pl.Series([prepared]).str.extract(r"^(.*/repo)/").item()  # .../datasets/repo
    target = offline_caches / "datasets" / "org___cached"
    shutil.copytree(config_dir, target)
    for arrow in target.rglob("repo-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("repo-", "cached-")))
    del loaded
    shutil.rmtree(repo)  # only the cache is left
    src = open_source("org/cached", split="test")
    assert (src.format, src.collect().height, src.total_rows()) == ("hf-dataset", 10, 10)
    with pytest.raises(PrefnoiseError, match="org/cached: has splits train, test; pass --split NAME"):
        open_source("org/cached")


def test_an_unknown_hub_id_fails_in_one_line_saying_offline(tmp_path, offline_caches):
    out = tmp_path / "out.parquet"
    line = assert_one_line_error(
        invoke("corrupt", "someone/missing-set", out, "--rate", "0.1", "--split", "train"),
        "someone/missing-set: not found locally or in the Hugging Face cache",
        "offline",
        "hf download --repo-type dataset someone/missing-set",
    )
    assert "no such file" not in line and "huggingface-cli" not in line
    assert_nothing_written(out)
    # a name with a table file's extension is a missing file, as before
    assert_one_line_error(invoke("inspect", tmp_path / "gone.parquet"), "gone.parquet: no such file or directory")


def test_split_and_config_are_refused_where_they_mean_nothing(tmp_path):
    path = tmp_path / "t.parquet"
    make_pairs(5).write_parquet(path)
    assert_one_line_error(invoke("inspect", path, "--split", "train"), "--split applies to hub datasets")
    assert_one_line_error(invoke("inspect", path, "--config", "x"), "--config applies to hub datasets")


def test_split_picks_a_saved_dataset_dict_split(tmp_path):
    frame = make_pairs(12)
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_polars(frame.head(8)), "test": datasets.Dataset.from_polars(frame.tail(4))}
    ).save_to_disk(str(saved))
    assert open_source(saved, split="test").collect()["prompt"].to_list() == frame.tail(4)["prompt"].to_list()
    with pytest.raises(PrefnoiseError, match="no split 'dev'; splits are: test, train"):
        open_source(saved, split="dev")
    assert_one_line_error(invoke("inspect", saved), "is a DatasetDict", "pass --split NAME")


def test_a_plain_shard_directory_is_not_hub_layout(tmp_path):
    shards = tmp_path / "shards"
    (shards / "part").mkdir(parents=True)
    make_pairs(4, seed=5).write_parquet(shards / "part" / "a.parquet")
    make_pairs(3, seed=6).write_parquet(shards / "b.parquet")
    src = open_source(shards)
    assert (src.format, src.split, src.collect().height) == ("parquet", None, 7)
