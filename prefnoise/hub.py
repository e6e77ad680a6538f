"""Hugging Face Hub datasets, offline: hub-layout directories, cached hub ids, their splits and configs.

prefnoise never touches the network. A dataset named by a hub id (``org/name``) is read from the
local Hugging Face caches only: the hub file cache (``$HF_HUB_CACHE``, a snapshot holding the
repository's README.md and data files, as ``hf download --repo-type dataset`` leaves
it) or, failing that, the ``datasets`` cache (``$HF_DATASETS_CACHE``, Arrow files written by an
earlier ``datasets.load_dataset``). A local directory laid out like a hub repository (README.md
with ``configs:`` in its YAML header, or ``data/<split>-*`` files) is read the same way.

``datasets`` resolves configs, splits and data-file patterns exactly as the hub does; the data
files themselves (Parquet, JSON lines, CSV) are then read by prefnoise's own checked, streaming
readers, so every row check, fingerprint and error message is the same as for a local file.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prefnoise.errors import PrefnoiseError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
# A name with one of these endings is a file the user meant, never a hub id.
_FILE_ENDINGS = (".parquet", ".pq", ".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".gz", ".zst", ".bz2", ".arrow")
# The split names the hub's data-file conventions recognise in ``data/<split>-*`` file names.
_SPLIT_WORDS = ("train", "training", "test", "testing", "eval", "evaluation", "validation", "valid", "val", "dev")
_SPLIT_FILE = re.compile(rf"^({'|'.join(_SPLIT_WORDS)})([-_.]|$)", re.IGNORECASE)
OFFLINE_NOTE = "offline: prefnoise never downloads"  # the words every not-found message carries


@dataclass(frozen=True)
class HubFiles:
    """One split of a hub dataset as data files on disk, read by prefnoise's own readers."""

    root: Path  # the repository directory (local or a cache snapshot); fingerprinted
    files: tuple[Path, ...]
    format: str  # parquet, json or csv
    split: str
    config: str


@dataclass(frozen=True)
class HubCached:
    """One split of a hub dataset held as Arrow files in the ``datasets`` cache."""

    root: Path  # the cache directory of that config; fingerprinted
    load: Callable[[], object]  # returns the datasets.Dataset of the split (memory-mapped)
    split: str
    config: str


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` can name a hub dataset (``name`` or ``org/name``) rather than a file."""
    return bool(HUB_ID.match(text)) and not text.lower().endswith(_FILE_ENDINGS)


def is_hub_layout(directory: Path) -> bool:
    """Whether ``directory`` is laid out like a hub dataset repository: a README.md whose YAML
    header has ``configs:``, or a ``data/`` folder with ``<split>-*`` / ``<split>.*`` files."""
    readme = directory / "README.md"
    if readme.is_file() and "configs" in _card_header(readme):
        return True
    data = directory / "data"
    return data.is_dir() and any(_SPLIT_FILE.match(p.name) for p in data.iterdir() if p.is_file())


def _card_header(readme: Path) -> dict:
    """The YAML header of a dataset card ({} when it has none or it is unreadable)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    import yaml

    try:
        header = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return header if isinstance(header, dict) else {}


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Run ``datasets`` / ``huggingface_hub`` in offline mode for the block (HF_HUB_OFFLINE=1
    semantics: nothing is looked up or downloaded), then restore the previous settings."""
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"))
    datasets.config.HF_HUB_OFFLINE = True
    hub_constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved[0], saved[1]
        if saved[2] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[2]
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _choose(kind: str, available: list[str], wanted: str | None, label: str, flag: str) -> str:
    """The config or split to read: ``wanted`` if available, the only one, else a one-line error."""
    if wanted is not None:
        if wanted not in available:
            raise PrefnoiseError(f"{label}: no {kind} {wanted!r}; {kind}s are: {', '.join(available)}")
        return wanted
    if len(available) == 1:
        return available[0]
    raise PrefnoiseError(f"{label}: has {kind}s {', '.join(available)}; pass {flag} NAME to pick one")


def resolve_hub_dir(
    directory: Path, *, split: str | None, config: str | None, label: str, within: Path | None = None
) -> HubFiles:
    """The data files of one split (and config) of a hub-layout directory, resolved by ``datasets``;
    each must lie (after symlinks) inside ``within`` (default: the directory)."""
    from datasets.data_files import DataFilesDict
    from datasets.load import dataset_module_factory

    try:
        with offline():
            module = dataset_module_factory(str(directory))
    except Exception as error:  # datasets raises many types for a directory it cannot read
        raise PrefnoiseError(f"{label}: cannot read as a hub dataset directory ({_first_line(error)})") from None
    params = module.builder_configs_parameters
    configs = {c.name: c for c in params.builder_configs or []}
    if not configs:
        raise PrefnoiseError(f"{label}: no data files found (expected data/<split>-*.parquet or README.md configs)")
    if config is None and len(configs) > 1 and params.default_config_name in configs:
        config = params.default_config_name
    chosen = configs[_choose("config", list(configs), config, label, "--config")]
    try:
        files = DataFilesDict.from_patterns(chosen.data_files or {}, base_path=str(directory))
    except Exception as error:
        raise PrefnoiseError(f"{label}: config {chosen.name!r}: {_first_line(error)}") from None
    where = label if len(configs) == 1 else f"{label} (config {chosen.name!r})"
    name = _choose("split", list(files), split, where, "--split")
    paths = tuple(Path(p) for p in files[name])
    root = (within or directory).resolve()
    for path in paths:
        if not path.resolve().is_relative_to(root):
            raise PrefnoiseError(
                f"{label}: data file {path} resolves outside the directory; copy it in or remove the link"
            )
    return HubFiles(
        root=Path(os.path.abspath(directory)),
        files=paths,
        format=_files_format(paths, label),
        split=name,
        config=chosen.name,
    )


def _files_format(paths: tuple[Path, ...], label: str) -> str:
    """parquet, json or csv: the one format of a split's data files."""
    kinds = set()
    for path in paths:
        suffixes = [s.lower() for s in path.suffixes]
        if suffixes and suffixes[-1] in (".gz", ".zst", ".bz2"):
            suffixes = suffixes[:-1]
        last = suffixes[-1] if suffixes else ""
        kind = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".ndjson": "json", ".json": "json"}.get(
            last, "csv" if last in (".csv", ".tsv") else None
        )
        if kind is None:
            raise PrefnoiseError(
                f"{label}: data file {path.name} is not Parquet, JSON lines or CSV; prefnoise reads those formats"
            )
        kinds.add(kind)
    if len(kinds) != 1:
        raise PrefnoiseError(f"{label}: one split mixes data formats ({', '.join(sorted(kinds))}); use one format")
    return kinds.pop()


def resolve_hub_id(repo_id: str, *, split: str | None, config: str | None) -> HubFiles | HubCached:
    """A hub dataset from the local caches only: a hub-cache snapshot, else the ``datasets`` cache;
    a one-line PrefnoiseError when it is in neither."""
    snapshot = cached_snapshot(repo_id, "dataset")
    if snapshot is not None:
        # snapshot files link to the repository cache's blobs/, which the check must allow
        return resolve_hub_dir(snapshot, split=split, config=config, label=repo_id, within=snapshot.parents[1])
    cached = _datasets_cache_dirs(repo_id)
    if not cached:
        import datasets
        import huggingface_hub.constants as hub_constants

        raise PrefnoiseError(
            f"{repo_id}: not found locally or in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}, "
            f"{datasets.config.HF_DATASETS_CACHE}); {OFFLINE_NOTE}, so fetch it first "
            f"(hf download --repo-type dataset {repo_id}) or pass a local file or directory"
        )
    config = _choose("config", sorted(cached), config, repo_id, "--config")
    import datasets

    try:
        with offline():
            builder = datasets.load_dataset_builder(repo_id, config)
    except Exception as error:
        raise PrefnoiseError(f"{repo_id}: cannot open the cached dataset ({_first_line(error)})") from None
    splits = list(builder.info.splits or {})
    if not splits:
        raise PrefnoiseError(f"{repo_id}: the cached dataset lists no splits; load it again with datasets")
    where = repo_id if len(cached) == 1 else f"{repo_id} (config {config!r})"
    name = _choose("split", splits, split, where, "--split")

    def load() -> object:
        try:
            with offline():
                return builder.as_dataset(split=name)
        except Exception as error:
            raise PrefnoiseError(f"{repo_id}: cannot read the cached split {name!r} ({_first_line(error)})") from None

    return HubCached(root=cached[config], load=load, split=name, config=config)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (as huggingface_hub does at import):
    ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/...``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str, repo_type: str = "model") -> Path | None:
    """The hub-cache snapshot directory of ``repo_id`` (a model or dataset repo, the revision ``main``
    names) in :func:`hub_cache_dir`, or None when it is not cached. Never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        with offline():
            return Path(snapshot_download(repo_id, repo_type=repo_type, cache_dir=str(hub_cache_dir()),
                                          local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None
    except Exception:  # a malformed cache entry is treated as absent
        return None


def _datasets_cache_dirs(repo_id: str) -> dict[str, Path]:
    """Config name → latest cache directory of ``repo_id`` in the ``datasets`` cache."""
    import datasets
    from datasets.naming import camelcase_to_snakecase

    parts = repo_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = Path(datasets.config.HF_DATASETS_CACHE) / "___".join(parts)
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for info in root.glob("*/*/*/dataset_info.json"):
        directory = info.parent
        name = directory.parent.parent.name
        if name not in found or directory.stat().st_mtime > found[name].stat().st_mtime:
            found[name] = directory
    return found


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
