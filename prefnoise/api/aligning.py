"""pn.align: preference-optimise a causal LM (the `align` command)."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefnoise.api.tables import NOTHING_WRITTEN, ProgressBar, Table, input_table, no_bar, path_of, split_options
from prefnoise.errors import PrefnoiseError
from prefnoise.loss_names import POLICY_RATE_OPTIONS
from prefnoise.noise_audit.handoff import AuditEstimate, read_audit_estimate
from prefnoise.options import flag_of
from prefnoise.options.align import AlignConfig
from prefnoise.options.training import INPUT_DEFAULTS, keyword_signature
from prefnoise.outputs import check_output_dir, check_output_file, releases_outputs


@dataclass
class AlignResult:
    """``pn.align``'s result: the summary (``align --json``'s object; the plan with ``dry_run``)."""

    summary: dict[str, Any]
    dry_run: bool = False


@releases_outputs
def align(data: Table, *, model: str, out: str | Path | None = None, options: AlignConfig | None = None,
          dry_run: bool = False, overwrite: bool = False, progress_bar: ProgressBar | None = None,
          **keywords: Any) -> AlignResult:
    """``prefnoise align``: fine-tune the local causal LM ``model`` with SymPO (default) or a DPO-family loss.

    Every training option of the CLI is a keyword with its parameter name (``loss``, ``beta``, ``clip``
    (0 turns it off), ``lr``, ``epochs``, ``max_steps``, ``lora_r``, ``seed`` ...: the fields of
    :class:`prefnoise.options.align.AlignConfig`), or ``options``, an AlignConfig; besides them the input
    options (``prompt_col``, ``layout``, ``drop_invalid``, ...). ``out`` is required unless ``dry_run``
    (which returns the plan). A run that fails or is interrupted removes what it wrote into a new ``out``
    unless it left checkpoints.
    """
    from prefnoise.policy import prepare, train  # heavy: torch, transformers

    input_options, align_options = split_options(keywords, others="AlignConfig")
    unknown = sorted(set(align_options) - {f.name for f in dataclasses.fields(AlignConfig)})
    if unknown:
        raise PrefnoiseError(f"align: unknown option {unknown[0]!r}; options are: {', '.join(sorted(KNOWN))}")
    cfg, audit = with_audit_rate(options or AlignConfig(model=str(model), out=str(out or ""), **align_options))
    if not out and not dry_run:
        raise PrefnoiseError("--out DIR is required (or use --dry-run to only print the plan)")
    if cfg.resume and overwrite:
        raise PrefnoiseError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    source = path_of(data)
    if cfg.ref_cache is not None:
        check_output_file(cfg.ref_cache, inputs=[source, model], overwrite=True, flag="--ref-cache")
    state = None
    if out and not dry_run:
        state = check_output_dir(out, command="align", inputs=[source, model], overwrite=overwrite, resume=cfg.resume)
        if cfg.resume:
            from prefnoise.training.runs import check_resumable  # heavy: prefnoise.training loads torch

            check_resumable(out, state, "align")
    src = input_table(data, input_options)
    frame, name = src.collect(), source if source is not None else src.name
    if dry_run:
        plan = dataclasses.asdict(prepare(cfg, frame, source=name).plan)
        return AlignResult({"dry_run": True, "input": name, **plan}, True)
    with cleaned_up_on_failure(Path(out), state), (progress_bar or no_bar)("aligning", None) as advance:
        summary = train(cfg, frame, source=name, on_progress=advance,
                        notes={"noise_rate_from": audit.provenance()} if audit else None)
    return AlignResult(summary)


def with_audit_rate(cfg: AlignConfig) -> tuple[AlignConfig, AuditEstimate | None]:
    """``cfg`` with cdpo's/rdpo's ε read from ``cfg.noise_rate_from`` (an audit's --json file), and the
    estimate; ``cfg`` unchanged without that file. Giving the rate as well is an error."""
    if cfg.noise_rate_from is None:
        return cfg, None
    option = POLICY_RATE_OPTIONS[cfg.loss]
    if getattr(cfg, option) is not None:
        raise PrefnoiseError(f"{flag_of(option)} and --noise-rate-from both give ε; pass one of them")
    audit = read_audit_estimate(cfg.noise_rate_from)
    return cfg.replace(**{option: audit.rate}), audit


KNOWN = {f.name for f in dataclasses.fields(AlignConfig)} - {"model", "out"}
align.__signature__ = keyword_signature(  # type: ignore[attr-defined]
    align, AlignConfig, before=("model", "out"), inputs=INPUT_DEFAULTS)


@contextlib.contextmanager
def cleaned_up_on_failure(out: Path, state: str | None) -> Iterator[None]:
    """On an error or interruption inside: remove what the run wrote into a new ``out`` unless it left
    checkpoints, and say what became of ``out`` (on the error)."""
    before = _listing(out)
    try:
        yield
    except BaseException as error:
        if is_main_process():
            interrupted = isinstance(error, KeyboardInterrupt) or type(error).__name__ == "Terminated"
            untouched = state is None or _listing(out) == before
            note = NOTHING_WRITTEN if untouched else clean_up_failed_run(out, state=state, resumable=interrupted)
            if interrupted:
                error.prefnoise_note = note  # type: ignore[union-attr]
            elif isinstance(error, PrefnoiseError) and not untouched:
                error.message = f"{error.message}; {note}"
        raise


def _listing(out: Path) -> dict[str, int] | None:
    """Every entry below ``out`` with its modification time (ns): to tell whether a run touched ``out``."""
    if not out.exists():
        return None
    return {str(p.relative_to(out)): p.lstat().st_mtime_ns for p in out.rglob("*")}


def clean_up_failed_run(out: Path, *, state: str | None, resumable: bool = True) -> str:
    """After an interrupted or failed run: if this run created ``out`` (``state`` 'missing' or 'empty'
    before it started) and left no checkpoint, remove what it wrote; say what became of ``out``.
    ``resumable``: the run stopped from outside (a signal), so continuing it makes sense."""
    from prefnoise.training import CHECKPOINTS_DIR, latest_checkpoint  # heavy: torch

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
    from accelerate import PartialState  # heavy: accelerate loads torch

    return PartialState().is_main_process
