"""The reference log-probs of every pair: read from the cache, or one no-grad pass of the starting policy
(sharded over processes) written to it."""

from __future__ import annotations

import contextlib
from pathlib import Path

import polars as pl
import torch

from prefnoise.errors import PrefnoiseError
from prefnoise.options.align import AlignConfig
from prefnoise.policy.logprobs import (
    REF_CHOSEN,
    REF_REJECTED,
    pad_token_id,
    read_reference_cache,
    reference_fingerprint,
    reference_logps,
    write_reference_cache,
)
from prefnoise.policy.plan import Prepared, resolve_precision

REF_CACHE_FILE = "ref_logps.parquet"


def assemble_reference(indexed_rows, n: int, schema) -> pl.DataFrame:
    """The reference frame in row order from (row index, row) pairs gathered over processes.

    Keyed by row index, not pair_id: rows that repeat a pair_id each keep their own values.
    """
    by_row = dict(indexed_rows)
    missing = [i for i in range(n) if i not in by_row]
    if missing:
        raise PrefnoiseError(f"the reference pass returned no log-probs for rows {missing[:5]}; "
                             "this is a bug, please report it")
    return pl.DataFrame([by_row[i] for i in range(n)], schema=schema, orient="row")


def reference_of(cfg: AlignConfig, run: Prepared, model: torch.nn.Module, accelerator
                 ) -> tuple[torch.Tensor, torch.Tensor, Path, bool]:
    """(chosen, rejected) reference log-probs per row, the cache's path, and whether the cache had them."""
    from accelerate.utils import gather_object  # heavy: accelerate's utils load torch.distributed

    pairs, processes = run.pairs, accelerator.num_processes
    precision = resolve_precision(cfg, accelerator.device.type == "cuda")
    fingerprint = reference_fingerprint(cfg.model, pairs.settings, precision)
    cache_path = Path(cfg.ref_cache) if cfg.ref_cache else Path(cfg.out) / REF_CACHE_FILE
    ref = read_reference_cache(cache_path, fingerprint, pairs)
    hit = ref is not None
    if ref is None:
        shard_rows = range(accelerator.process_index, len(pairs), processes)
        shard = pairs.subset(shard_rows)
        base = model.disable_adapter() if cfg.lora_r else contextlib.nullcontext()
        with base, accelerator.autocast():
            part = reference_logps(model, shard, pad_id=pad_token_id(run.tokenizer),
                                   batch_size=2 * cfg.batch_size, device=accelerator.device)
        indexed = list(zip(shard_rows, part.rows(), strict=True))
        ref = assemble_reference(gather_object(indexed) if processes > 1 else indexed, len(pairs), part.schema)
        if accelerator.is_main_process:
            write_reference_cache(ref, cache_path, fingerprint)
        accelerator.wait_for_everyone()
    chosen = torch.tensor(ref[REF_CHOSEN].to_numpy(), dtype=torch.float32)
    rejected = torch.tensor(ref[REF_REJECTED].to_numpy(), dtype=torch.float32)
    return chosen, rejected, cache_path, hit
