"""pn.split: a deterministic, prompt-disjoint train/test split (the `split` command)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from prefnoise import columns as C
from prefnoise.api.engines import engine_of, engine_paths, engine_session, name_input
from prefnoise.api.tables import STDIO, Table, build_options, gather_input_options, input_table, output_name, path_of
from prefnoise.data import new_history_entry, write_table
from prefnoise.engine.split import split_on_ray
from prefnoise.errors import PrefnoiseError
from prefnoise.heldout import split_table
from prefnoise.options import SplitOptions
from prefnoise.outputs import check_distinct_outputs, check_output_file, releases_outputs


@dataclass
class SplitResult:
    """``pn.split``'s result: the training and held-out tables and the summary; unpacks as (train, test)."""

    train: pl.DataFrame
    test: pl.DataFrame
    summary: dict[str, Any]

    def __iter__(self) -> Iterator[pl.DataFrame]:
        return iter((self.train, self.test))


@releases_outputs
def split(
    data: Table,
    train_out: str | Path | None = None,
    test_out: str | Path | None = None,
    options: SplitOptions | None = None,
    *,
    test_fraction: float = 0.2, by: str = "prompt", seed: int = C.DEFAULT_SEED,
    overwrite: bool = False,
    prompt_col: str = C.PROMPT, chosen_col: str = C.CHOSEN, rejected_col: str = C.REJECTED,
    layout: str = "auto", drop_invalid: bool = False,
    engine: str = "local", ray_address: str | None = None, workers: int | None = None,
    **input_options: Any,
) -> SplitResult:
    """``prefnoise split``: a deterministic held-out split, prompt-disjoint (``by="prompt"``) or by pair.

    Options: :class:`prefnoise.options.SplitOptions` (``options`` or its fields as keywords). With
    ``train_out`` and ``test_out`` both sides are written with provenance; ``summary`` is ``split --json``'s.
    ``engine="ray"`` decides the blocks' sides on a Ray cluster (paths may then be filesystem URIs): the same
    tables and summary as the local engine (docs/distributed.md).
    """

    options = build_options(SplitOptions, options, locals())
    engine_options = engine_of(engine, ray_address, workers)
    outs = [train_out, test_out]
    with engine_paths(engine_options, data, outs, overwrite=overwrite, flags=("TRAIN", "TEST")) as (
        local_data, (local_train, local_test)
    ):
        _check_outputs(local_data, local_train, local_test, overwrite)
        src = input_table(
            local_data,
            gather_input_options(prompt_col, chosen_col, rejected_col, layout, drop_invalid, input_options),
        )
        name_input(src, data)
        frame = src.collect()
        with engine_session(engine_options) as session:
            values = {"test_fraction": options.test_fraction, "by": options.by, "seed": options.seed}
            train, test = split_table(frame, **values) if session is None else split_on_ray(session, frame, **values)
        if train.height == 0 or test.height == 0:
            raise PrefnoiseError(
                f"{src.name}: the split left the {'training' if train.height == 0 else 'test'} side empty "
                f"({frame.height} rows, --test-fraction {options.test_fraction}); use more data or another fraction"
            )
        if train_out is not None:
            _write_parts(src, options, ((train, local_train, "train"), (test, local_test, "test")), overwrite)
    summary = {
        "input": src.name, "rows": frame.height, "by": options.by, "seed": options.seed,
        "train": {"output": output_name(train_out), "rows": train.height, "prompts": train[C.PROMPT].n_unique()},
        "test": {"output": output_name(test_out), "rows": test.height, "prompts": test[C.PROMPT].n_unique()},
        "shared_prompts": len(set(train[C.PROMPT].unique().to_list()) & set(test[C.PROMPT].unique().to_list())),
    }
    return SplitResult(train, test, summary)


def _check_outputs(data: Table, train_out: str | Path | None, test_out: str | Path | None, overwrite: bool) -> None:
    """Both outputs or neither; two distinct files, neither the input nor a file prefnoise did not write."""

    if (train_out is None) != (test_out is None):
        raise PrefnoiseError("give both train_out and test_out, or neither")
    if train_out is None:
        return
    if STDIO in (str(train_out), str(test_out)):
        raise PrefnoiseError("TRAIN and TEST must be files (two tables cannot share stdout)")
    for flag, dest in (("TRAIN", train_out), ("TEST", test_out)):
        check_output_file(dest, inputs=[path_of(data)], overwrite=overwrite, flag=flag)
    check_distinct_outputs({"TRAIN": train_out, "TEST": test_out})


def _write_parts(src: Any, options: SplitOptions, parts: tuple, overwrite: bool) -> None:
    """Each (table, destination, part name) written with its provenance entry."""

    parameters = {"test_fraction": options.test_fraction, "by": options.by}
    for table, dest, part in parts:
        entry = new_history_entry("split", {**parameters, "part": part}, seed=options.seed, source=src.source)
        write_table(table, dest, entry=entry, overwrite=overwrite)
