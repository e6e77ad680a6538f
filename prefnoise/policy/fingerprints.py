"""What an align checkpoint must match to be resumed: the options, the data and the model."""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefnoise.errors import PrefnoiseError
from prefnoise.options.align import LEGACY_OPTIONS, RESUME_FREE, AlignConfig
from prefnoise.policy.logprobs import TokenizedPairs
from prefnoise.training import changed_options
from prefnoise.training import save_checkpoint as save_training_state

MODEL_HASH_LIMIT = 64 * 2**20  # model files up to this size (config, tokenizer) are hashed in full


def save_checkpoint(accelerator, checkpoints: Path, step: int, cfg: AlignConfig,
                    run_state: dict[str, Any] | None = None) -> Path:
    """Save model, optimizer and every process's RNG state at ``step``; keep only the newest.

    ``run_state`` (chat date, data and model fingerprints) goes into trainer.json beside the options.
    """
    return save_training_state(accelerator, checkpoints, step, {"config": asdict(cfg), **(run_state or {})})


def check_resumable(cfg: AlignConfig, saved: dict[str, Any], where: Path, *,
                    saved_run: dict[str, Any] | None = None, run: dict[str, Any] | None = None) -> None:
    """PrefnoiseError if an option that shapes training differs from the checkpoint's, or (given the
    checkpoint's ``saved_run`` and this run's ``run`` state) the model or the data do.

    A checkpoint written before data and model fingerprints were recorded is checked on options only.
    """
    changed = changed_options(saved, asdict(cfg), RESUME_FREE, LEGACY_OPTIONS)
    if changed:
        raise PrefnoiseError(f"--resume: {where} was written with different {', '.join(changed)}; "
                             "use the same options or drop --resume to start over")
    if saved_run is None or run is None:
        return
    if "model" in saved_run and saved_run["model"] != run["model"]:
        raise PrefnoiseError(f"--resume: the model differs from the checkpoint's "
                             f"({describe_model_change(saved_run['model'], run['model'])}); "
                             "use the same --model or start over with --overwrite")
    if "data" in saved_run and saved_run["data"] != run["data"]:
        raise PrefnoiseError(f"--resume: the data differs from the checkpoint's "
                             f"({describe_data_change(saved_run['data'], run['data'])}); "
                             "use the same data or start over with --overwrite")


def data_fingerprint(pairs: TokenizedPairs) -> dict[str, Any]:
    """What the run trains on, in order: the pair count, a digest of the pair_ids and one of the
    pairs' token ids (so a changed text or a flipped label shows, a reformatted file does not)."""
    ids = hashlib.blake2b(digest_size=16)
    for pair_id in pairs.pair_ids:
        ids.update(str(pair_id).encode() + b"\0")
    content = hashlib.blake2b(digest_size=16)
    for key in pairs.content_keys():
        content.update(key.encode())
    return {"pairs": len(pairs), "pair_ids": ids.hexdigest(), "tokens": content.hexdigest()}


def describe_data_change(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between two ``data_fingerprint`` results, in words."""
    if saved.get("pairs") != now["pairs"]:
        return f"{now['pairs']} pairs now, {saved.get('pairs')} then"
    if saved.get("pair_ids") != now["pair_ids"]:
        return f"the same number of pairs ({now['pairs']}) but other pair_ids or another order"
    return "the same pair_ids, but the text or the labels of some pairs changed"


def model_fingerprint(model_path: str | Path) -> dict[str, list[Any]]:
    """Per file of the --model directory: [size, mtime in ns, content hash or None].

    Files up to ``MODEL_HASH_LIMIT`` (config, tokenizer, small weights) are hashed; larger ones
    are known by size and mtime only. A link out of the directory is followed for its stats only.
    """
    root = Path(model_path)
    base = root.resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    result: dict[str, list[Any]] = {}
    for file in files:
        st = file.stat()
        digest = None
        if st.st_size <= MODEL_HASH_LIMIT and file.resolve().is_relative_to(base):
            with open(file, "rb") as handle:
                digest = hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
        result[file.relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns, digest]
    return result


def describe_model_change(saved: dict[str, list[Any]], now: dict[str, list[Any]]) -> str:
    """The first file that differs between two ``model_fingerprint`` results, in words."""
    for name in sorted(set(saved) | set(now)):
        if name not in now:
            return f"{name} is gone"
        if name not in saved:
            return f"{name} is new"
        (size0, mtime0, hash0), (size1, mtime1, hash1) = saved[name], now[name]
        if hash0 != hash1 or size0 != size1:
            return f"{name} has other content"
        if mtime0 != mtime1:
            return f"{name} was modified since"
    return "other files"
