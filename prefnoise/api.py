"""The Python API: one call per subcommand, with the CLI's option names; the CLI is a thin layer over it.

    import prefnoise as pn

    noisy = pn.corrupt(df, rate=0.2, seed=0).table          # df: polars, pandas, pyarrow, datasets.Dataset or a path
    train, test = pn.split(noisy, test_fraction=0.2)
    fit = pn.fit_reward(train, loss="ramp")                  # .model, .summary
    scored = pn.score(fit, test).table
    report = pn.rank_check(scored)                            # .report, .summary (= `rank-check --json`), .passed

Every function takes a table in any of the accepted forms (see :func:`as_polars`) and the input options
``prompt_col``, ``chosen_col``, ``rejected_col``, ``layout`` and ``drop_invalid`` (plus any further input
option of the CLI, such as ``--chosen-score-col``, by its parameter name). Each returns a small result
object whose ``summary`` is the object the subcommand prints with ``--json``. Passing an output path
(``out``, ``train_out``/``test_out``) writes it as the CLI does (atomically, with provenance, never over a
file prefnoise did not write); without one nothing is written. Bad input raises
:class:`prefnoise.errors.PrefnoiseError` with the one-line message the CLI prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError
from prefnoise.outputs import releases_outputs

# A progress-bar factory: (description, total or None) -> context manager yielding advance(n).
ProgressBar = Callable[[str, "int | None"], AbstractContextManager[Callable[[int], None]]]
Table = Any  # polars DataFrame/LazyFrame, pandas DataFrame, pyarrow Table/RecordBatch, datasets.Dataset, str, Path

STDIO = "-"
NOTHING_WRITTEN = "no output was written."


# --------------------------------------------------------------------------- inputs


def _kind(table: Any) -> str:
    """``module.Class`` of ``table``'s type, e.g. ``pandas.DataFrame`` (its module's top package only)."""
    cls = type(table)
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def table_label(table: Any) -> str:
    """How messages and summaries name ``table``: its path, ``<stdin>``, or ``<pandas.DataFrame>`` etc."""
    if isinstance(table, str | Path):
        return "<stdin>" if str(table) == STDIO else str(table)
    return f"<{_kind(table)}>"


def _is_path(table: Any) -> bool:
    return isinstance(table, str | Path)


def _to_arrow(table: Any, name: str) -> pa.Table | None:
    """An in-memory table of a non-polars library as an Arrow table (None for polars or unknown types)."""
    kind = _kind(table)
    if isinstance(table, pa.Table):
        return table
    if isinstance(table, pa.RecordBatch):
        return pa.Table.from_batches([table])
    if kind.startswith("pandas.") and type(table).__name__ == "DataFrame":
        try:
            return pa.Table.from_pandas(table, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as error:
            raise PrefnoiseError(f"{name}: cannot convert the pandas columns ({_first_line(error)})") from None
    if kind.startswith("datasets."):
        cls = type(table).__name__
        if cls in ("DatasetDict", "IterableDatasetDict"):
            raise PrefnoiseError(f"{name}: a DatasetDict ({', '.join(table)}); pass one split, e.g. table['train']")
        if cls == "IterableDataset":
            raise PrefnoiseError(f"{name}: an IterableDataset; materialise it first (Dataset.from_generator or take)")
        if cls == "Dataset":
            return table.with_format("arrow")[:]  # applies any select/shuffle index mapping
    return None


def _first_line(error: BaseException) -> str:
    from prefnoise.data import first_error_line

    return first_error_line(error)


def _raw_frame(table: Any, name: str | None = None) -> pl.DataFrame:
    """An in-memory table as a polars DataFrame, columns untouched (no mapping or validation)."""
    from prefnoise.data import _check_batch, _to_polars

    name = name or table_label(table)
    if isinstance(table, pl.LazyFrame):
        table = table.collect()
    if isinstance(table, pl.DataFrame):
        return table
    arrow = _to_arrow(table, name)
    if arrow is None and isinstance(table, Mapping | list):
        try:
            return pl.DataFrame(table)
        except (pl.exceptions.PolarsError, TypeError, ValueError) as error:
            raise PrefnoiseError(f"{name}: cannot read as a table ({_first_line(error)})") from None
    if arrow is None:
        raise PrefnoiseError(
            f"{name}: not a table prefnoise reads; pass a polars, pandas or pyarrow table, a datasets.Dataset, "
            "or a path"
        )
    offset = 0
    for batch in arrow.to_batches():
        _check_batch(batch, name, offset)  # malformed or invalid-UTF-8 columns: a one-line error, as for files
        offset += batch.num_rows
    return _to_polars(arrow, name)


def _column_map(options: dict[str, Any]):
    """The ColumnMap of the ``<field>_col`` options (every field ColumnMap has, e.g. prompt_col)."""
    from prefnoise.data import ColumnMap

    values = {}
    for item in dataclasses.fields(ColumnMap):
        key = f"{item.name}_col"
        if key in options:
            values[item.name] = options.pop(key)
    return ColumnMap(**values)


class InputTable:
    """A preference table opened for a pn.* call: a file source (streamed like the CLI) or an in-memory
    table canonicalised once. ``batches()`` yields canonical frames, ``collect()`` the whole table."""

    def __init__(self, table: Table, *, warn_history: bool = True, **options: Any) -> None:
        self.name = table_label(table)
        self.source = None  # the PreferenceSource of a path (its history and fingerprint go into provenance)
        self._frame: pl.DataFrame | None = None
        self._dropped: dict[str, int] = {}
        if _is_path(table):
            from prefnoise.cli.common import open_input

            self.source = open_input(str(table), warn_history=warn_history, **options)
            self.name = self.source.name
            return
        from prefnoise.data import LAYOUTS, canonicalize

        options = dict(options)
        columns = _column_map(options)
        layout = options.pop("layout", "auto")
        drop_invalid = options.pop("drop_invalid", False)
        unused = {k: v for k, v in options.items() if v not in (None, False)}
        if unused:
            raise PrefnoiseError(
                f"{self.name}: option {next(iter(unused))}= applies to paths and hub ids only, not to in-memory tables"
            )
        if layout not in LAYOUTS:
            raise PrefnoiseError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
        raw = _raw_frame(table, self.name)
        if raw.height == 0:
            raise PrefnoiseError(f"{self.name}: contains no rows")
        frame, self._dropped = canonicalize(
            raw, columns=columns, layout=layout, drop_invalid=drop_invalid, name=self.name
        )
        if frame.height == 0:
            raise PrefnoiseError(
                f"{self.name}: no valid rows: drop_invalid skipped every row; run without it to see why"
            )
        self._frame = frame

    @property
    def history(self) -> list[dict[str, Any]]:
        """The provenance history of a Parquet input ([] otherwise)."""
        return list(self.source.history) if self.source is not None else []

    @property
    def dropped(self) -> dict[str, int]:
        """Rows left out by drop_invalid, by reason."""
        return dict(self.source.dropped) if self.source is not None else dict(self._dropped)

    @property
    def schema(self) -> pl.Schema:
        """The canonical schema."""
        return self.source.schema if self.source is not None else self._frame.schema

    def total_rows(self) -> int | None:
        """Row count when it is free to get (None for a file whose format does not record it)."""
        return self.source.total_rows() if self.source is not None else self._frame.height

    def batches(self) -> Iterator[pl.DataFrame]:
        """Validated canonical batches (one for an in-memory table)."""
        return self.source.batches() if self.source is not None else iter([self._frame])

    def collect(self) -> pl.DataFrame:
        """The whole canonical table."""
        return self.source.collect() if self.source is not None else self._frame


def as_polars(
    table: Table,
    *,
    prompt_col: str = C.PROMPT,
    chosen_col: str = C.CHOSEN,
    rejected_col: str = C.REJECTED,
    layout: str = "auto",
    drop_invalid: bool = False,
    **input_options: Any,
) -> pl.DataFrame:
    """The canonical prefnoise table (``pair_id``, ``prompt``, ``chosen``, ``rejected``, ...) of ``table``.

    ``table``: a polars DataFrame or LazyFrame, a pandas DataFrame, a pyarrow Table or RecordBatch, a
    ``datasets.Dataset``, a dict of columns or list of rows, or a path (Parquet, JSONL, CSV, saved dataset,
    shard directory; ``-`` for stdin). Column mapping, ``layout`` ("auto": canonical or TRL conversational;
    "hh": full transcripts) and validation are the CLI's (``prefnoise.data.canonicalize``): a ``pair_id``
    is added when absent, and a bad row raises PrefnoiseError unless ``drop_invalid`` skips it.
    """
    return InputTable(
        table, prompt_col=prompt_col, chosen_col=chosen_col, rejected_col=rejected_col, layout=layout,
        drop_invalid=drop_invalid, warn_history=False, **input_options,
    ).collect()


def _input(table: Table, options: dict[str, Any]) -> InputTable:
    return InputTable(table, **options)


def _raw_lazy(table: Table, **options: Any) -> pl.LazyFrame:
    """A table as it is (no validation; of the column options only the true-score mapping applies), lazily
    when it is a file: for scored and long tables. ``options``: ``chosen_score_col``/``rejected_score_col``
    and, for hub ids, ``split``/``config``."""
    from prefnoise.data import ColumnMap, map_score_columns, open_source

    columns = ColumnMap(chosen_score=options.pop("chosen_score_col", None),
                        rejected_score=options.pop("rejected_score_col", None))
    if _is_path(table):
        return open_source(str(table), columns=columns, **options).scan_raw()
    unused = [k for k, v in options.items() if v is not None]
    if unused:
        raise PrefnoiseError(f"{table_label(table)}: option {unused[0]}= applies to paths and hub ids only")
    lazy = table if isinstance(table, pl.LazyFrame) else _raw_frame(table).lazy()
    return map_score_columns(lazy, columns, table_label(table))


def _path_of(table: Table) -> str | None:
    """The input path to protect from being overwritten (None for in-memory tables)."""
    return str(table) if _is_path(table) else None


@contextlib.contextmanager
def _no_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def _check_options(values: dict[str, Any]) -> None:
    """The CLI's range checks of numeric options (seed, rate, ...), for calls that do not come through it."""
    from prefnoise.options import check_options

    check_options({k: v for k, v in values.items() if not k.startswith("_")})


def input_option_names() -> frozenset[str]:
    """The input options every table-reading command shares: the parameters of the CLI's ``open_input``."""
    import inspect

    from prefnoise.cli.common import open_input

    return frozenset(inspect.signature(open_input).parameters) - {"source", "warn_history"}


def _split_options(options: dict[str, Any], *, others: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(input options, the rest) of keyword ``options``; the rest is a TypeError unless ``others`` names
    where they go."""
    names = input_option_names()
    inputs = {k: v for k, v in options.items() if k in names}
    rest = {k: v for k, v in options.items() if k not in names}
    if rest and others is None:
        raise TypeError(f"unexpected keyword argument {next(iter(rest))!r}")
    return inputs, rest


def _input_options(
    prompt_col: str, chosen_col: str, rejected_col: str, layout: str, drop_invalid: bool, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "prompt_col": prompt_col, "chosen_col": chosen_col, "rejected_col": rejected_col, "layout": layout,
        "drop_invalid": drop_invalid, **_split_options(extra)[0],
    }


def _output_name(out: str | Path | None) -> str | None:
    return None if out is None else ("<stdout>" if str(out) == STDIO else str(out))


# --------------------------------------------------------------------------- corrupt


@dataclass
class CorruptResult:
    """``pn.corrupt``'s result: the noisy table (None when it was streamed to ``out``) and the summary."""

    table: pl.DataFrame | None
    summary: dict[str, Any]


@releases_outputs
def corrupt(
    data: Table,
    out: str | Path | None = None,
    *,
    noise: str = "symmetric",
    rate: float | None = None,
    rate_pos: float | None = None,
    rate_neg: float | None = None,
    by: str = "longer",
    temperature: float = 1.0,
    max_rate: float = 0.3,
    exact: bool = False,
    force: bool = False,
    overwrite: bool = False,
    seed: int = C.DEFAULT_SEED,
    prompt_col: str = C.PROMPT,
    chosen_col: str = C.CHOSEN,
    rejected_col: str = C.REJECTED,
    layout: str = "auto",
    drop_invalid: bool = False,
    progress_bar: ProgressBar | None = None,
    **input_options: Any,
) -> CorruptResult:
    """``prefnoise corrupt``: flip labels with a controlled noise model; record which rows in ``flipped``.

    Options are the CLI's (``noise``: symmetric, asymmetric, bt or uniform, with ``rate``, ``rate_pos``/
    ``rate_neg`` + ``by``, ``temperature``, ``max_rate``; ``exact``; ``force``; ``seed``). With ``out`` the
    table is streamed to that file batch by batch (memory stays flat; ``table`` is then None); without it
    the noisy table is returned. ``summary`` is ``corrupt --json``'s object (flips per group with intervals).
    """
    from prefnoise.data import new_history_entry, write_table
    from prefnoise.noise import CorruptionStats, NoiseSpec, corrupt_batches, corrupt_step, exact_thresholds
    from prefnoise.outputs import check_output_file
    from prefnoise.pair_ids import PairIdCheck

    _check_options(locals())
    spec = NoiseSpec(
        kind=noise, rate=rate, rate_pos=rate_pos, rate_neg=rate_neg, by=by, temperature=temperature,
        max_rate=max_rate, exact=exact, seed=seed, force=force, drop_invalid=drop_invalid,
    )
    spec.check()
    if out is not None:
        check_output_file(out, inputs=[_path_of(data)], overwrite=overwrite)
    started = time.perf_counter()
    src = _input(data, _input_options(prompt_col, chosen_col, rejected_col, layout, drop_invalid, input_options))
    spec = dataclasses.replace(spec, step=corrupt_step(src.history))  # each corrupt step draws afresh
    spec.check(src.schema)
    entry = new_history_entry("corrupt", spec.parameters(), seed=seed, source=src.source)
    stats = CorruptionStats()
    table = None
    with (progress_bar or _no_bar)("corrupting", src.total_rows()) as advance:
        thresholds = exact_thresholds(src.batches(), spec, name=src.name) if spec.exact else None
        inputs = PairIdCheck(src.name, reread=src.batches).watch(src.batches())
        batches = corrupt_batches(inputs, spec, stats=stats, thresholds=thresholds, on_progress=advance, name=src.name)
        if out is None:
            frames = list(batches)
            if not frames:
                raise PrefnoiseError("no rows left: every input row was filtered out")
            table = pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]
        else:
            write_table(batches, out, entry=entry, overwrite=overwrite)
    elapsed = time.perf_counter() - started
    summary = {
        "input": src.name,
        "output": _output_name(out),
        "noise": noise,
        **stats.to_dict(),
        "dropped": {**src.dropped, **stats.dropped},
        "seconds": round(elapsed, 3),
        "rows_per_second": round(stats.rows / elapsed) if elapsed > 0 else None,
    }
    return CorruptResult(table, summary)


# --------------------------------------------------------------------------- split


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
    *,
    test_fraction: float = 0.2,
    by: str = "prompt",
    seed: int = C.DEFAULT_SEED,
    overwrite: bool = False,
    prompt_col: str = C.PROMPT,
    chosen_col: str = C.CHOSEN,
    rejected_col: str = C.REJECTED,
    layout: str = "auto",
    drop_invalid: bool = False,
    **input_options: Any,
) -> SplitResult:
    """``prefnoise split``: a deterministic held-out split, prompt-disjoint (``by="prompt"``) or by pair.

    With ``train_out`` and ``test_out`` both sides are written with provenance; ``summary`` is ``split
    --json``'s object.
    """
    from prefnoise.data import new_history_entry, write_table
    from prefnoise.heldout import check_split_options, split_table
    from prefnoise.outputs import check_distinct_outputs, check_output_file

    _check_options(locals())
    check_split_options(test_fraction, by)  # before the input is read
    if (train_out is None) != (test_out is None):
        raise PrefnoiseError("give both train_out and test_out, or neither")
    if train_out is not None:
        if STDIO in (str(train_out), str(test_out)):
            raise PrefnoiseError("TRAIN and TEST must be files (two tables cannot share stdout)")
        for dest in (train_out, test_out):
            check_output_file(dest, inputs=[_path_of(data)], overwrite=overwrite)
        check_distinct_outputs({"TRAIN": train_out, "TEST": test_out})
    src = _input(data, _input_options(prompt_col, chosen_col, rejected_col, layout, drop_invalid, input_options))
    frame = src.collect()
    train, test = split_table(frame, test_fraction=test_fraction, by=by, seed=seed)
    if train.height == 0 or test.height == 0:
        raise PrefnoiseError(
            f"{src.name}: the split left the {'training' if train.height == 0 else 'test'} side empty "
            f"({frame.height} rows, --test-fraction {test_fraction}); use more data or another fraction"
        )
    if train_out is not None:
        parameters = {"test_fraction": test_fraction, "by": by}
        for part, table, dest in (("train", train, train_out), ("test", test, test_out)):
            entry = new_history_entry("split", {**parameters, "part": part}, seed=seed, source=src.source)
            write_table(table, dest, entry=entry, overwrite=overwrite)
    summary = {
        "input": src.name,
        "rows": frame.height,
        "by": by,
        "seed": seed,
        "train": {"output": _output_name(train_out), "rows": train.height, "prompts": train[C.PROMPT].n_unique()},
        "test": {"output": _output_name(test_out), "rows": test.height, "prompts": test[C.PROMPT].n_unique()},
        "shared_prompts": len(set(train[C.PROMPT].unique().to_list()) & set(test[C.PROMPT].unique().to_list())),
    }
    return SplitResult(train, test, summary)


# --------------------------------------------------------------------------- fit-reward


@dataclass
class FitRewardResult:
    """``pn.fit_reward``'s result: the trained ``model`` (score it with :func:`score`), the training
    ``fit`` (metrics, pair splits) and ``summary`` (``fit-reward --json``'s object)."""

    model: Any
    fit: Any
    summary: dict[str, Any]


@releases_outputs
def fit_reward(
    data: Table,
    out: str | Path | None = None,
    *,
    loss: str = "sigmoid",
    model: str | None = None,
    encoder: str | None = None,
    margin_scale: float = 1.0,
    eps: float | None = None,
    tau: float | None = None,
    alpha: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float = 0.0,
    val_fraction: float = 0.1,
    early_stopping: int | None = None,
    device: str = "auto",
    max_length: int | None = None,
    hidden: int = 256,
    layers: int = 2,
    dropout: float = 0.0,
    output_clip: float = 20.0,
    cache_dir: str | Path | None = None,
    embed_features: str | None = None,
    head: str | None = None,
    schedule: str | None = None,
    warmup: float | None = None,
    grad_accum: int = 1,
    max_grad_norm: float | None = None,
    precision: str = "auto",
    lora_r: int = 0,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    log_every: int = 10,
    save_every: int = 0,
    resume: bool = False,
    report_to: str = "none",
    overwrite: bool = False,
    seed: int = C.DEFAULT_SEED,
    prompt_col: str = C.PROMPT,
    chosen_col: str = C.CHOSEN,
    rejected_col: str = C.REJECTED,
    layout: str = "auto",
    drop_invalid: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> FitRewardResult:
    """``prefnoise fit-reward``: train a reward model r(prompt, response) with a margin loss.

    ``model``: None (the mlp on feature columns), "mlp", "embed+mlp" (with ``encoder``) or a local HF model
    directory or hub id. With ``out`` the model directory is written as the CLI writes it. Further keyword
    options are input options (see :func:`input_option_names`) or go to
    :func:`prefnoise.reward.fit_reward_model`. ``on_start``/``on_progress``/``on_epoch`` follow training.
    With ``save_every``, ``resume`` or ``report_to`` the run writes into ``out`` as it trains (checkpoints,
    metrics.jsonl, tracker logs under runs/), as align does.
    """
    from prefnoise.cli.fit_reward import backend_of
    from prefnoise.data import new_history_entry
    from prefnoise.loss_names import MARGIN_LOSS_NAMES, MARGIN_RATE_PARAMS, missing_rate
    from prefnoise.outputs import check_output_dir
    from prefnoise.reward import fit_reward_model, save_reward_model

    _check_options(locals())
    if loss not in MARGIN_LOSS_NAMES:
        raise PrefnoiseError(f"unknown --loss {loss!r}; choose one of: {', '.join(MARGIN_LOSS_NAMES)}")
    missing = missing_rate(loss, {"eps": eps}, MARGIN_RATE_PARAMS)
    if missing:
        raise PrefnoiseError(missing)
    if encoder is not None and model != "embed+mlp":
        raise PrefnoiseError("--encoder applies to --model embed+mlp only")
    if embed_features is not None and model != "embed+mlp":
        raise PrefnoiseError("--embed-features applies to --model embed+mlp only")
    if head is not None and head not in ("sequence-classification", "pooled"):
        raise PrefnoiseError(f"--head must be sequence-classification or pooled, got {head!r}")
    if out is not None:
        check_output_dir(
            out, command="fit-reward", inputs=[_path_of(data), model, encoder, cache_dir], overwrite=overwrite,
            resume=resume,
        )
    input_options, fit_options = _split_options(options, others="fit_reward_model")
    src = _input(data, _input_options(prompt_col, chosen_col, rejected_col, layout, drop_invalid, input_options))
    frame = src.collect()
    backend, model_path = backend_of(model, C.chosen(C.FEATURES) in frame.columns)
    options = {
        "loss": loss,
        "backend": backend,
        "model_path": model_path,
        "encoder_path": encoder,
        "loss_params": {"eps": eps, "tau": tau, "alpha": alpha},
        "margin_scale": margin_scale,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "val_fraction": val_fraction,
        "early_stopping": early_stopping,
        "device": device,
        "max_length": max_length,
        "hidden": hidden,
        "layers": layers,
        "dropout": dropout,
        "output_clip": output_clip if output_clip > 0 else None,
        "cache_dir": cache_dir,
        "embed_features": embed_features,
        "head": head,
        "schedule": schedule,
        "warmup": warmup,
        "grad_accum": grad_accum,
        "max_grad_norm": max_grad_norm,
        "precision": precision,
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "log_every": log_every,
        "save_every": save_every,
        "resume": resume,
        "report_to": report_to,
        **fit_options,
    }
    entry = new_history_entry(
        "fit-reward", {k: v for k, v in options.items() if k != "cache_dir"}, seed=seed, source=src.source
    )
    callbacks = {k: v for k, v in (("on_start", on_start), ("on_progress", on_progress), ("on_epoch", on_epoch)) if v}
    writes_as_it_trains = bool(save_every or resume or report_to != "none")
    run_dir = out if out is not None and writes_as_it_trains else None
    fit = fit_reward_model(frame, seed=seed, drop_invalid=drop_invalid, source=src.name, run_dir=run_dir,
                           **options, **callbacks)
    summary = {
        "out": None if out is None else str(out),
        "rows": frame.height,
        **{k: v for k, v in fit.metrics.items() if k != "epochs"},
    }
    if out is not None and fit.is_main:  # other data-parallel processes: the main one writes
        save_reward_model(fit, out, history=[*src.history, entry.to_dict(rows_out=frame.height)])
    return FitRewardResult(fit.model, fit, summary)


# --------------------------------------------------------------------------- score


@dataclass
class ScoreResult:
    """``pn.score``'s result: the table with rewards, the model used, and the summary."""

    table: pl.DataFrame
    model: Any
    summary: dict[str, Any]
    truncation_note: str | None = None  # one line on the sequences cut to max_length (None when none)


def _reward_model(model: Any, cache_dir: str | Path | None) -> tuple[Any, Any, str]:
    """(RewardModel, training pair splits or None, its name) from a path, hub id, fit result or model."""
    from prefnoise.heldout import read_training_pairs
    from prefnoise.reward import RewardModel, load_reward_model

    if isinstance(model, str | Path):
        loaded = load_reward_model(model, cache_dir=cache_dir)
        splits = read_training_pairs(model) if Path(model).is_dir() else None
        return loaded, splits, str(model)
    if isinstance(model, FitRewardResult):
        model = model.fit
    if hasattr(model, "model") and hasattr(model, "pair_splits"):  # a FitResult
        return model.model, model.pair_splits, f"<{model.model.backend} reward model>"
    if isinstance(model, RewardModel):
        return model, None, f"<{model.backend} reward model>"
    raise PrefnoiseError(
        f"model: expected a reward model directory, a hub id, or what pn.fit_reward returned; got {_kind(model)}"
    )


@releases_outputs
def score(
    model: Any,
    data: Table,
    out: str | Path | None = None,
    *,
    responses: bool = False,
    batch_size: int | None = None,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    prompt_col: str = C.PROMPT,
    chosen_col: str = C.CHOSEN,
    rejected_col: str = C.REJECTED,
    layout: str = "auto",
    drop_invalid: bool = False,
    progress_bar: ProgressBar | None = None,
    **input_options: Any,
) -> ScoreResult:
    """``prefnoise score``: add ``chosen_reward``/``rejected_reward`` (``reward`` with ``responses``).

    ``model``: a directory written by ``fit-reward``, a plain sequence-classification model directory or
    hub id (num_labels=1, as TRL's RewardTrainer saves it), or what :func:`fit_reward` returned. Rows the
    model trained or validated on are marked (``in_training``/``in_validation``). ``summary`` is ``score
    --json``'s object (agreement with the labels, held out where known).
    """
    from prefnoise.data import new_history_entry, read_history, write_table
    from prefnoise.heldout import agreement_summary, mark_seen
    from prefnoise.outputs import check_output_file
    from prefnoise.reward import score_responses, score_table
    from prefnoise.reward.models import describe_truncation

    _check_options(locals())
    model_input = str(model) if isinstance(model, str | Path) else None
    if out is not None:
        check_output_file(out, inputs=[model_input, _path_of(data)], overwrite=overwrite)
    started = time.perf_counter()
    reward_model, splits, model_name = _reward_model(model, cache_dir)
    parameters = {"model": model_name, "responses": responses, "batch_size": batch_size}
    if responses:
        hub = {k: v for k, v in input_options.items() if k in ("split", "config")}
        frame = _raw_lazy(data, **hub).collect()
        path = _path_of(data)
        history = read_history(path) if path and path != STDIO and Path(path).suffix == ".parquet" else []
        entry = new_history_entry("score", parameters)
        run = score_responses
    else:
        src = _input(data, _input_options(prompt_col, chosen_col, rejected_col, layout, drop_invalid, input_options))
        frame = src.collect()
        history = src.history
        entry = new_history_entry("score", parameters, source=src.source)
        run = score_table
    # embed+mlp spends its time in the encoder (texts not in the embedding cache): the bar follows that
    misses = _texts_to_embed(reward_model, frame, responses)
    with (progress_bar or _no_bar)(*(("embedding", misses) if misses else ("scoring", frame.height))) as advance:
        progress = {"on_embed": advance} if misses else {"on_progress": advance}
        scored = run(reward_model, frame, batch_size, device=device, drop_invalid=drop_invalid,
                     source=table_label(data), model_name=model_name, **progress)
    if splits is not None and not responses:
        scored = mark_seen(scored, splits)  # in_training / in_validation travel on to rank-check --group-by
    rows = write_table(scored, out, entry=entry, history=history, overwrite=overwrite) if out else scored.height
    elapsed = time.perf_counter() - started
    seen = ("in_training", "in_validation")
    summary: dict[str, Any] = {
        "model": model_name,
        "backend": reward_model.backend,
        "rows": rows,
        "output": _output_name(out),
        "columns": [C.REWARD] if responses else [c for c in scored.columns if c.endswith(C.REWARD) or c in seen],
        "seconds": round(elapsed, 3),
    }
    if not responses:
        summary.update(agreement_summary(scored))
    truncation = getattr(reward_model, "truncation", [])
    summary["truncated_sequences"] = sum(s["truncated"] for s in truncation)
    cut = describe_truncation(truncation, reward_model.config.get("max_length") or 0)
    return ScoreResult(scored, reward_model, summary, cut)


def _texts_to_embed(reward_model: Any, frame: pl.DataFrame, responses: bool) -> int:
    """How many texts scoring ``frame`` makes an embed+mlp model's encoder run (0 for other backends)."""
    if not hasattr(reward_model, "to_embed") or C.PROMPT not in frame.columns:
        return 0
    prompts = frame[C.PROMPT].to_list()
    if responses:
        return reward_model.to_embed(prompts, frame["response"].to_list()) if "response" in frame.columns else 0
    if C.CHOSEN not in frame.columns or C.REJECTED not in frame.columns:
        return 0
    return reward_model.to_embed(prompts + prompts, frame[C.CHOSEN].to_list() + frame[C.REJECTED].to_list())


# --------------------------------------------------------------------------- rank-check


@dataclass
class RankCheckResult:
    """``pn.rank_check``'s result: the :class:`prefnoise.rank.RankReport`, the summary (``rank-check
    --json``'s object, with ``gate_failures``), and whether every gate passed."""

    report: Any
    summary: dict[str, Any]

    @property
    def failures(self) -> list[str]:
        """One line per failed gate."""
        return self.summary["gate_failures"]

    @property
    def passed(self) -> bool:
        """True when no gate failed (the CLI exits 1 otherwise)."""
        return not self.failures


def gate_failures(
    metrics: Any, min_agreement: float | None, min_kendall: float | None, min_preservation: float | None
) -> list[str]:
    """One line per failed gate (a metric that cannot be computed fails its gate)."""
    gates = [
        ("agreement", metrics.agreement.value, min_agreement),
        ("kendall_tau_b", metrics.kendall_tau_b, min_kendall),
        ("preservation", metrics.preservation.value, min_preservation),
    ]
    return [
        f"{name} {'n/a' if value is None else f'{value:.4f}'} < {threshold}"
        for name, value, threshold in gates
        if threshold is not None and (value is None or value < threshold)
    ]


@releases_outputs
def rank_check(
    data: Table,
    *,
    pred: str = C.REWARD,
    true: str | None = None,
    long: bool = False,
    group_by: list[str] | tuple[str, ...] | str | None = None,
    bootstrap: int = 1000,
    show_worst: int = 0,
    plot: str | Path | None = None,
    min_agreement: float | None = None,
    min_kendall: float | None = None,
    min_preservation: float | None = None,
    memory_responses: int | None = None,
    temp_dir: str | Path | None = None,
    overwrite: bool = False,
    seed: int = C.DEFAULT_SEED,
    model: Any = None,
    device: str = "auto",
    batch_size: int | None = None,
    chosen_score_col: str | None = None,
    rejected_score_col: str | None = None,
    split: str | None = None,
    config: str | None = None,
    progress_bar: ProgressBar | None = None,
    **input_options: Any,
) -> RankCheckResult:
    """``prefnoise rank-check``: pairwise agreement, rank preservation, Kendall's tau-b and Spearman's rho
    of a predicted reward against the true one (or the labels), overall and per ``flipped``/``group_by``.

    ``data``: a scored pair table (``chosen_<pred>``/``rejected_<pred>``) or, with ``long``, a long table.
    ``chosen_score_col``/``rejected_score_col`` map the true reward (columns or dotted paths). ``model``
    (optional): score ``data`` with this reward model first (see :func:`score`; the other input options,
    e.g. ``prompt_col``, then apply). The ``min_*`` gates fail into ``result.failures``; ``plot`` writes a PNG.
    """
    from prefnoise.outputs import check_output_file
    from prefnoise.rank import DEFAULT_MEMORY_RESPONSES, rank_report

    _check_options(locals())
    check_output_file(plot, inputs=[_path_of(data)], overwrite=overwrite, flag="--plot", suffix=".png")
    label = str(data) if _is_path(data) else table_label(data)  # as given (the CLI's JSON keeps '-')
    if model is not None:
        if long:
            raise PrefnoiseError("--model scores a pair table; it does not apply with --long")
        scored = score(model, data, device=device, batch_size=batch_size, chosen_score_col=chosen_score_col,
                       rejected_score_col=rejected_score_col, split=split, config=config, **input_options)
        lazy = scored.table.lazy()
    else:
        _split_options(input_options)  # only input options are accepted
        if any(v not in (None, False, C.PROMPT, C.CHOSEN, C.REJECTED, "auto") for v in input_options.values()):
            raise PrefnoiseError("the column and layout options apply with --model only (rank-check reads DATA as is)")
        # a file: resolves "-" (spooled stdin), existence, format and hub ids; adds the mapped true scores
        lazy = _raw_lazy(data, chosen_score_col=chosen_score_col, rejected_score_col=rejected_score_col,
                         split=split, config=config)
    splits = [group_by] if isinstance(group_by, str) else list(group_by or [])
    with (progress_bar or _no_bar)("rank-check %", 100) as advance:
        report = rank_report(
            lazy, pred=pred, true=true, group_by=splits, n_boot=bootstrap, seed=seed, worst=show_worst,
            layout="long" if long else "auto",
            memory_responses=DEFAULT_MEMORY_RESPONSES if memory_responses is None else memory_responses,
            temp_dir=temp_dir, on_progress=advance,
        )
    failures = gate_failures(report.overall, min_agreement, min_kendall, min_preservation)
    if plot is not None:
        _rank_plot(lazy, report, Path(plot), seed)
    return RankCheckResult(report, {"source": label, **report.to_dict(), "gate_failures": failures})


def _rank_plot(lazy: pl.LazyFrame, report: Any, out: Path, seed: int) -> None:
    from prefnoise.plots import rank_check_figure
    from prefnoise.rank import figure_frames

    points, pairs = figure_frames(lazy, pred=report.pred, true=report.true or C.SCORE, layout=report.layout)
    x, y = ("true", "pred") if "true" in points.columns else ("rejected", "chosen")
    rank_check_figure(
        points[x].to_numpy(), points[y].to_numpy(), pairs["true_margin"].to_numpy(), pairs["outcome"].to_numpy(),
        agreement=report.overall.agreement.value, out=out, seed=seed, labels=(f"{x} reward", f"{y} reward"),
    )


# --------------------------------------------------------------------------- audit


@dataclass
class AuditResult:
    """``pn.audit``'s result: the table with ``oof_margin`` (and ``fold``, ``suspicion``; cleaned with ``fix``),
    the noise estimate (``estimate.identifiable``, ``estimate.rate``: None when undetermined, with
    ``estimate.reason``), and the summary (``audit --json``'s object)."""

    table: pl.DataFrame
    estimate: Any
    summary: dict[str, Any]


@releases_outputs
def audit(
    data: Table,
    out: str | Path | None = None,
    *,
    folds: int = 5,
    refits: int = 3,
    reward_col: str | None = None,
    margin_col: str | None = None,
    loss: str = "sigmoid",
    model: str | None = None,
    encoder: str | None = None,
    embed_features: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    hidden: int = 256,
    max_length: int | None = None,
    head: str | None = None,
    device: str = "auto",
    bootstrap: int = 200,
    show_suspects: int = 10,
    show_text: bool = False,
    plot: str | Path | None = None,
    fix: str | None = None,
    threshold: float = 0.5,
    overwrite: bool = False,
    seed: int = C.DEFAULT_SEED,
    prompt_col: str = C.PROMPT,
    chosen_col: str = C.CHOSEN,
    rejected_col: str = C.REJECTED,
    layout: str = "auto",
    drop_invalid: bool = False,
    progress_bar: ProgressBar | None = None,
    **input_options: Any,
) -> AuditResult:
    """``prefnoise audit``: cross-fit reward models (``folds`` × ``refits``), estimate the flip rate ε̂ and
    score each pair's suspicion; or take out-of-sample margins as given (``reward_col``/``margin_col``).

    Wraps :mod:`prefnoise.audit` as the CLI does. When ε̂ is undetermined (``result.estimate.identifiable``
    False) the summary's rate is None with a reason, and ``fix`` ("drop" or "swap", with ``out``) refuses
    with a PrefnoiseError of exit code 4.
    """
    from prefnoise import audit as A
    from prefnoise.cli.fit_reward import backend_of
    from prefnoise.data import new_history_entry, write_table
    from prefnoise.outputs import check_distinct_outputs, check_output_file
    from prefnoise.reward import check_finite_features

    _check_options(locals())
    if fix is not None and out is None:
        raise PrefnoiseError("--fix needs --out for the cleaned table")
    if fix is not None and fix not in ("drop", "swap"):
        raise PrefnoiseError(f"--fix must be 'drop' or 'swap', got {fix!r}")
    if reward_col is not None and margin_col is not None:
        raise PrefnoiseError("give only one of --reward-col and --margin-col")
    started = time.time()  # the history entry's duration covers the folds, not only the writing
    check_output_file(out, inputs=[_path_of(data)], overwrite=overwrite)
    check_output_file(plot, inputs=[_path_of(data)], overwrite=overwrite, flag="--plot", suffix=".png")
    check_distinct_outputs({"--out": out, "--plot": plot})
    src = _input(data, _input_options(prompt_col, chosen_col, rejected_col, layout, drop_invalid, input_options))
    given = reward_col is not None or margin_col is not None
    if given:
        frame = src.collect()
        scored = A.given_margins(frame, reward_col=reward_col, margin_col=margin_col)
        margins = scored[A.MARGIN].to_numpy()
        backend, parameters = "given predictions", {"reward_col": reward_col, "margin_col": margin_col}
    else:
        frame, _ = check_finite_features(src.collect(), src.name, drop_invalid)
        backend, model_path = backend_of(model, C.chosen(C.FEATURES) in frame.columns)
        fit_options = {
            "loss": loss, "backend": backend, "model_path": model_path, "encoder_path": encoder,
            "embed_features": embed_features, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "hidden": hidden, "max_length": max_length, "val_fraction": 0.0,
            "head": head,
        }
        with (progress_bar or _no_bar)("cross-fitting folds", folds * refits) as advance:
            scored, margins = A.cross_fitted_margins(
                frame, folds=folds, refits=refits, seed=seed, fit_options=fit_options, device=device, on_fold=advance
            )
        parameters = {"folds": folds, "refits": refits, **{k: v for k, v in fit_options.items() if v is not None}}
    estimate = A.estimate_noise_rate(margins, n_boot=bootstrap, seed=seed)
    if fix is not None and not estimate.identifiable:
        raise PrefnoiseError(
            f"--fix: the flip rate is undetermined, so suspicion has no calibration; nothing written "
            f"({estimate.reason})",
            exit_code=A.UNDETERMINED_EXIT,
        )
    scored = A.add_suspicion(scored, estimate.mixture)
    fixed = 0
    if fix is not None:
        scored, fixed = A.clean_table(scored, mode=fix, threshold=threshold)
    if out is not None:
        entry = new_history_entry("audit", {**parameters, "fix": fix, "threshold": threshold}, seed=seed,
                                  source=src.source)
        entry.started = started
        entry.extra["noise_estimate"] = _history_estimate(estimate)
        if fix is not None:
            entry.extra["fixed_pairs"] = {"mode": fix, "count": fixed}
        write_table(scored, out, entry=entry, overwrite=overwrite)
    if plot is not None:
        from prefnoise.experiments.figures import margin_histogram

        margin_histogram(scored[A.MARGIN].to_numpy(), estimate.mixture, plot)
    suspects = None if estimate.mixture is None else int((scored[A.SUSPICION] > threshold).sum()) if fix is None else 0
    summary: dict[str, Any] = {
        "input": src.name,
        "pairs": frame.height,
        "folds": None if given else folds,
        "refits": None if given else refits,
        "loss": None if given else loss,
        "backend": backend,
        "margins_from": _margins_from(reward_col, margin_col),
        "identifiable": estimate.identifiable,
        "noise_rate": estimate.to_dict(),
        "suspects_above_threshold": suspects,
        "threshold": threshold,
        "fixed": {"mode": fix, "count": fixed} if fix else None,
        "most_suspect": A.most_suspect(scored, show_suspects, with_text=show_text),
    }
    if C.FLIPPED in scored.columns and fix is None and scored[C.FLIPPED].n_unique() == 2:
        flipped = scored[C.FLIPPED].to_numpy()
        suspicion = -scored[A.MARGIN].to_numpy()  # suspicion's ranking, defined also when ε̂ is undetermined
        summary["against_flipped"] = {
            "true_rate": float(flipped.mean()),
            "auroc": A.auroc(suspicion, flipped),
            "precision_at_true_count": A.precision_at(suspicion, flipped, int(flipped.sum())),
        }
    return AuditResult(scored, estimate, summary)


def _margins_from(reward_col: str | None, margin_col: str | None) -> str:
    if margin_col is not None:
        return f"column {margin_col}"
    if reward_col is not None:
        return f"columns {C.chosen(reward_col)} − {C.rejected(reward_col)}"
    return "cross-fitted fold models"


def _history_estimate(estimate: Any) -> dict[str, Any]:
    """What the history records of ε̂: the rate (None when undetermined, with the reason) and how it was made."""
    return {
        "rate": estimate.rate,
        "low": estimate.low,
        "high": estimate.high,
        "identifiable": estimate.identifiable,
        "reason": estimate.reason,
        "own_error_bias_high": estimate.own_error_bias_high,
        "refits": [r["rate"] for r in estimate.refits],
    }


# --------------------------------------------------------------------------- align


@dataclass
class AlignResult:
    """``pn.align``'s result: the summary (``align --json``'s object; the plan with ``dry_run``)."""

    summary: dict[str, Any]
    dry_run: bool = False


@releases_outputs
def align(
    data: Table,
    *,
    model: str,
    out: str | Path | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    prompt_col: str = C.PROMPT,
    chosen_col: str = C.CHOSEN,
    rejected_col: str = C.REJECTED,
    layout: str = "auto",
    drop_invalid: bool = False,
    progress_bar: ProgressBar | None = None,
    **options: Any,
) -> AlignResult:
    """``prefnoise align``: fine-tune the local causal LM ``model`` with SymPO (default) or a DPO-family loss.

    Every training option of the CLI is a keyword with its parameter name (``loss``, ``beta``, ``clip``
    (0 turns it off), ``lr``, ``epochs``, ``max_steps``, ``lora_r``, ``seed`` ...: the fields of
    :class:`prefnoise.align.AlignConfig`). ``out`` is required unless ``dry_run`` (which returns the plan).
    A run that fails or is interrupted removes what it wrote into a new ``out`` unless it left checkpoints.
    """
    from prefnoise.align import AlignConfig, check_config, prepare, train
    from prefnoise.outputs import check_output_dir, check_output_file

    input_options, options = _split_options(options, others="AlignConfig")
    _check_options(options)
    known = {f.name for f in dataclasses.fields(AlignConfig)} - {"model", "out"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise PrefnoiseError(f"align: unknown option {unknown[0]!r}; options are: {', '.join(sorted(known))}")
    if "clip" in options:
        options["clip"] = options["clip"] or None  # the CLI's 0 turns the clip off
    cfg = AlignConfig(model=str(model), out=str(out or ""), **options)
    check_config(cfg)  # a missing cdpo/rdpo rate or a bad option fails before anything is read
    if not out and not dry_run:
        raise PrefnoiseError("--out DIR is required (or use --dry-run to only print the plan)")
    if cfg.resume and overwrite:
        raise PrefnoiseError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    source = _path_of(data)
    if cfg.ref_cache is not None:
        check_output_file(cfg.ref_cache, inputs=[source, model], overwrite=True, flag="--ref-cache")
    state = None
    if out and not dry_run:
        state = check_output_dir(out, command="align", inputs=[source, model], overwrite=overwrite, resume=cfg.resume)
    src = _input(data, _input_options(prompt_col, chosen_col, rejected_col, layout, drop_invalid, input_options))
    frame = src.collect()
    name = source if source is not None else src.name
    if dry_run:
        return AlignResult({"dry_run": True, **dataclasses.asdict(prepare(cfg, frame, source=name).plan)}, True)
    before = _listing(Path(out))
    try:
        with (progress_bar or _no_bar)("aligning", None) as advance:
            summary = train(cfg, frame, source=name, on_progress=advance)
    except BaseException as error:
        if is_main_process():
            interrupted = isinstance(error, KeyboardInterrupt) or type(error).__name__ == "Terminated"
            untouched = state is None or _listing(Path(out)) == before
            note = NOTHING_WRITTEN if untouched else clean_up_failed_run(Path(out), state=state, resumable=interrupted)
            if interrupted:
                error.prefnoise_note = note  # type: ignore[union-attr]
            elif isinstance(error, PrefnoiseError) and not untouched:
                error.message = f"{error.message}; {note}"
        raise
    return AlignResult(summary)


def _listing(out: Path) -> dict[str, int] | None:
    """Every entry below ``out`` with its modification time (ns): to tell whether a run touched ``out``."""
    if not out.exists():
        return None
    return {str(p.relative_to(out)): p.lstat().st_mtime_ns for p in out.rglob("*")}


def clean_up_failed_run(out: Path, *, state: str | None, resumable: bool = True) -> str:
    """After an interrupted or failed run: if this run created ``out`` (``state`` 'missing' or 'empty'
    before it started) and left no checkpoint, remove what it wrote; say what became of ``out``.
    ``resumable``: the run stopped from outside (a signal), so continuing it makes sense."""
    from prefnoise.align import CHECKPOINTS_DIR, latest_checkpoint

    if latest_checkpoint(out / CHECKPOINTS_DIR) is not None:
        hint = "continue with --resume" if resumable else "start over with --overwrite and other options"
        return f"checkpoints in {out} were kept; {hint}"
    if state in ("missing", "empty"):
        if out.is_dir():
            for entry in out.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            if state == "missing":
                out.rmdir()
        return NOTHING_WRITTEN
    return f"{out} holds only what earlier runs wrote and this run's partial metrics"


def is_main_process() -> bool:
    """Whether this is the main process of a data-parallel run (always True for a single process)."""
    from accelerate import PartialState

    return PartialState().is_main_process


__all__ = [
    "AlignResult",
    "AuditResult",
    "CorruptResult",
    "FitRewardResult",
    "InputTable",
    "RankCheckResult",
    "ScoreResult",
    "SplitResult",
    "align",
    "as_polars",
    "audit",
    "corrupt",
    "fit_reward",
    "rank_check",
    "score",
    "split",
    "table_label",
]
