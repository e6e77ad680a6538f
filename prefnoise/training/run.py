"""One training run's housekeeping, the same for fit-reward and align: the accelerator, the run directory
and its marker, resuming from a checkpoint (and refusing one written with other options, data or model),
the metrics log, the trackers, checkpoints, and the end (FSDP gather, trackers closed).

What a step is, and when to evaluate, stays with the task (:mod:`prefnoise.reward.task`,
:mod:`prefnoise.policy.trainer`).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefnoise.errors import PrefnoiseError
from prefnoise.outputs import check_output_dir, write_marker
from prefnoise.training.accelerator import check_report_to, make_accelerator, start_trackers
from prefnoise.training.runs import (
    CHECKPOINTS_DIR,
    METRICS_FILE,
    MetricsLog,
    changed_options,
    latest_checkpoint,
    read_trainer_state,
    save_checkpoint,
    truncate_metrics,
)


@dataclass(frozen=True)
class RunSpec:
    """What a command's run is: its name (the output directory's marker and the trackers' project), its
    options (stored in every checkpoint, compared on resume, sent to the trackers) and the rules of resuming.

    ``free``: options that may change on --resume; ``legacy``: values of options a checkpoint written
    before they existed ran with; ``clear``: what an earlier run left in the directory that a new
    (not resumed) run removes.
    """

    command: str
    options: dict[str, Any]
    free: Sequence[str] = ()
    legacy: dict[str, Any] = field(default_factory=dict)
    clear: Sequence[str] = (CHECKPOINTS_DIR, METRICS_FILE)


class Run:
    """The accelerator and run directory of one run, and its checkpoint to resume from (if any)."""

    def __init__(self, spec: RunSpec, run_dir: str | Path | None, *, device: str, precision: str,
                 report_to: str, resume: bool) -> None:
        check_report_to(report_to, run_dir)
        self.spec, self.report_to = spec, report_to
        self.dir = Path(run_dir) if run_dir is not None else None
        self.accelerator = make_accelerator(device, precision, report_to=report_to, run_dir=run_dir)
        self.resume_from = latest_checkpoint(self.dir / CHECKPOINTS_DIR) if resume and self.dir else None
        self.saved = read_trainer_state(self.resume_from) if self.resume_from is not None else None
        self.log: MetricsLog | None = None

    @property
    def main(self) -> bool:
        """Whether this is the process that writes."""
        return self.accelerator.is_main_process

    def check_options(self) -> None:
        """PrefnoiseError when the checkpoint was written with other options (besides the free ones)."""
        if self.saved is None:
            return
        changed = changed_options(self.saved["config"], self.spec.options, self.spec.free, self.spec.legacy)
        if changed:
            raise PrefnoiseError(f"--resume: {self.resume_from} was written with different {', '.join(changed)}; "
                                 "use the same options or drop --resume to start over")

    def check_same(self, key: str, now: Any, what: str, describe: Callable[[Any, Any], str], advice: str) -> None:
        """PrefnoiseError when the checkpoint's ``key`` (a fingerprint of the data or the model) differs from
        ``now``; a checkpoint written before it was recorded passes."""
        if self.saved is None or key not in self.saved or self.saved[key] == now:
            return
        raise PrefnoiseError(f"--resume: the {what} differs from the checkpoint's ({describe(self.saved[key], now)}); "
                             f"{advice}")

    def start(self, *, on_log: Callable[[dict[str, Any]], None] | None = None) -> MetricsLog:
        """Create the run directory (marked as the command's; never a foreign one); when not resuming, clear
        what an earlier run left there. Return the metrics log, started; the trackers open."""
        if self.dir is not None and self.main:
            check_output_dir(self.dir, command=self.spec.command, overwrite=True, resume=True)
            self.dir.mkdir(parents=True, exist_ok=True)
            write_marker(self.dir, self.spec.command)  # lists what is there now (ownership was just checked)
            if self.resume_from is None:
                for name in self.spec.clear:
                    path = self.dir / name
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        self.log = MetricsLog(self.accelerator, self.dir / METRICS_FILE if self.dir is not None else None,
                              report_to=self.report_to, on_log=on_log)
        return self.log

    def restore(self) -> int:
        """Load the checkpoint's model, optimizer and RNG states (after the model is prepared); drop the
        metrics logged after it. Return its step (0 when not resuming)."""
        if self.resume_from is None or self.saved is None:
            return 0
        self.accelerator.load_state(str(self.resume_from))
        step = self.saved["step"]
        if self.main and self.dir is not None:
            kept = truncate_metrics(self.dir / METRICS_FILE, step)
            if self.log is not None:
                self.log.records = kept
        return step

    def open_trackers(self) -> None:
        """Start the --report-to trackers with the run's options as hyperparameters."""
        start_trackers(self.accelerator, self.report_to, self.spec.command, self.spec.options)

    def save(self, step: int, state: dict[str, Any], extra: Callable[[Path], None] | None = None) -> Path:
        """A checkpoint at ``step`` with the options and ``state`` (loop counters, fingerprints)."""
        if self.dir is None:
            raise PrefnoiseError("--save-every and --resume need an output directory (--out) for the checkpoints")
        return save_checkpoint(self.accelerator, self.dir / CHECKPOINTS_DIR, step,
                               {"config": self.spec.options, **state}, extra)

    def sharded(self) -> bool:
        """Whether the model will be sharded by FSDP."""
        from accelerate.utils import DistributedType  # heavy: accelerate's utils load torch.distributed

        return self.accelerator.distributed_type == DistributedType.FSDP

    def unsharded_copy(self, module: torch.nn.Module) -> torch.nn.Module | None:
        """Under FSDP (which shards the module in place), a copy to receive the gathered weights at the end."""
        return copy.deepcopy(module) if self.sharded() else None

    def gather(self, prepared: torch.nn.Module, unsharded: torch.nn.Module | None) -> torch.nn.Module | None:
        """Under FSDP, every process gathers; the main one's ``unsharded`` copy gets the weights (returned)."""
        if unsharded is None:
            return None
        full = self.accelerator.get_state_dict(prepared)
        if self.main:
            unsharded.load_state_dict(full)
        return unsharded.to(self.accelerator.device)

    def end(self) -> None:
        """Wait for every process and close the trackers (and, launched, the process group)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
