"""The one training loop of prefnoise: reward models (``fit-reward``, every backend) and policies (``align``).

Both build the same pieces, on accelerate:

- :func:`make_accelerator`: CPU or CUDA, bf16 autocast where supported, data-parallel (DDP) or FSDP
  under ``accelerate launch``, trackers for ``--report-to``;
- :class:`Trainer`: AdamW (no decay on biases and norms), the learning rate of :func:`learning_rate`
  set before every optimizer step, micro-batches accumulated with a divisor each (so a step's gradient
  is that of the mean per-pair loss over all its pairs and processes), gradient clipping, and a
  :class:`DivergenceWatch` that stops a run whose loss, gradient norm or weights turn NaN or inf;
- :class:`MetricsLog`: one JSON object per record in ``metrics.jsonl``, mirrored to the trackers;
- checkpoints: :func:`save_checkpoint` (accelerate state: model, optimizer, every process's RNG,
  plus ``trainer.json``), :func:`latest_checkpoint`, :func:`read_trainer_state`, :func:`truncate_metrics`.

What differs between the two commands (what a micro-batch is, its loss, when to evaluate) stays with
them; how a step is taken is here only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from prefnoise.atomic import atomic_write_text
from prefnoise.errors import PrefnoiseError

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
REPORT_TO = ("none", "tensorboard", "trackio", "wandb")
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
TRACKER_DIR = "runs"  # --report-to logs, under the output directory
TRAINER_STATE = "trainer.json"

# The package each tracker needs (accelerate imports it when the tracker starts).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}


def learning_rate(step: int, total_steps: int, lr: float, schedule: str, warmup_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup from lr/(w+1) to lr over the first w = ``warmup_steps`` steps, then constant,
    linear decay towards 0 at ``total_steps`` (as transformers' linear schedule, except that step 0
    is not 0: every step moves the weights), or cosine decay.
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return lr * max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda[:N]``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PrefnoiseError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise PrefnoiseError(f"--device must be auto, cpu or cuda, got {device!r}")


def resolve_precision(precision: str, on_cuda: bool) -> str:
    """"bf16" or "fp32": ``auto`` picks bf16 autocast on a GPU that supports it, fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "fp32"


def check_report_to(report_to: str, run_dir: str | Path | None) -> None:
    """PrefnoiseError unless ``report_to`` is a known tracker whose package is installed and has a directory."""
    if report_to not in REPORT_TO:
        raise PrefnoiseError(f"--report-to must be one of {', '.join(REPORT_TO)}, not {report_to!r}")
    if report_to == "none":
        return
    import importlib.util

    package = TRACKER_PACKAGES[report_to]
    if importlib.util.find_spec(package) is None:
        raise PrefnoiseError(f"--report-to {report_to} needs the {package} package: pip install {package}")
    if run_dir is None:
        raise PrefnoiseError(f"--report-to {report_to} needs an output directory (--out) for its logs")


def make_accelerator(device: str = "auto", precision: str = "auto", *, report_to: str = "none",
                     run_dir: str | Path | None = None):
    """The accelerate ``Accelerator`` of a run: ``device`` (auto, cpu, cuda), mixed precision from
    ``precision`` (bf16 autocast, or none), trackers for ``report_to`` logging under ``run_dir/runs``.

    Under ``accelerate launch`` the process group, DDP or FSDP come from the launcher's config.
    """
    from accelerate import Accelerator

    on_cuda = resolve_device(device).type == "cuda"
    mixed = "bf16" if resolve_precision(precision, on_cuda) == "bf16" else "no"
    trackers: dict[str, Any] = {}
    if report_to != "none":
        trackers = {"log_with": report_to, "project_dir": str(Path(run_dir) / TRACKER_DIR)}
    if fsdp_requested() and not torch.cuda.is_available():
        return _fsdp_on_cpu(cpu=device == "cpu", mixed_precision=mixed, **trackers)
    return Accelerator(cpu=device == "cpu", mixed_precision=mixed, **trackers)


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (it exports ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def _fsdp_on_cpu(**options: Any):
    """An Accelerator that shards with FSDP2 over CPU processes (gloo).

    accelerate 1.x turns FSDP on for GPU-like devices only: on CPU it quietly falls back to DDP (with a
    launcher's FSDP config) or raises (FSDP1). torch's FSDP2 (``fully_shard``) runs on gloo, so the
    state accelerate keeps is switched to FSDP here, with the plugin built from the launcher's FSDP_*
    variables. Measured against one process at the same global batch in tests/test_fsdp.py.
    """
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise PrefnoiseError("FSDP on CPU needs fsdp_version: 2 in the accelerate config (FSDP1 needs a GPU); "
                             "see configs/accelerate/fsdp_cpu.yaml")
    if options.get("mixed_precision", "no") != "no":
        raise PrefnoiseError("FSDP on CPU trains in fp32: use --precision fp32 or a GPU")
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables the launcher exported
    accelerator = Accelerator(fsdp_plugin=plugin, **options)
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        shared = (PartialState._shared_state, AcceleratorState._shared_state)
        if not all(isinstance(state, dict) and "distributed_type" in state for state in shared):
            raise PrefnoiseError("FSDP on CPU: this accelerate version keeps its state differently; "
                                 "run FSDP on GPUs, or data-parallel (DDP) on CPU")
        for state in shared:
            state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
    elif accelerator.distributed_type != DistributedType.FSDP:
        raise PrefnoiseError(f"an FSDP config was given but accelerate runs {accelerator.distributed_type}: "
                             "launch 2 or more processes (accelerate launch --config_file ...)")
    return accelerator


def tracker_config(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` as trackers accept hyperparameters: numbers, strings and booleans (others as text)."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in options.items()}


def start_trackers(accelerator, report_to: str, project: str, options: dict[str, Any]) -> None:
    """Open the ``report_to`` trackers (on the main process) with the run's options as hyperparameters."""
    if report_to != "none":
        accelerator.init_trackers(project, config=tracker_config(options))


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (not biases or norms)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


Fail = Callable[..., PrefnoiseError]  # fail(what, value, step, after=False) -> the error that stops the run


class DivergenceWatch:
    """Stops a run whose loss, gradient norm or weights become NaN or inf, without a sync per step.

    ``note`` keeps each optimizer step's mean loss and gradient norm on the device; ``check``
    (called before anything is logged, evaluated or saved) reads them all at once, gathered over
    processes so that every process raises the same error (``fail(what, value, step, after)``) at
    the first bad step.
    """

    def __init__(self, accelerator, fail: Fail) -> None:
        self.accelerator, self.fail = accelerator, fail
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []
        self.last_step = 0

    def note(self, step: int, losses: list[torch.Tensor], grad_norm: torch.Tensor | None) -> None:
        """Remember optimizer step ``step`` (0-based): its micro-batch losses and gradient norm."""
        loss = torch.cat([x.reshape(-1) for x in losses]).float().mean()
        norm = loss.new_zeros(()) if grad_norm is None else torch.as_tensor(grad_norm).float().to(loss.device)
        self.steps.append(step + 1)
        self.last_step = step + 1
        self.values.append(torch.stack([loss, norm]))

    def check(self, model=None) -> None:
        """Raise at the first noted step with a non-finite loss or gradient norm, or (with ``model``)
        when a weight is non-finite; forget the noted steps."""
        steps, values = self.steps, self.values
        self.steps, self.values = [], []
        if values:
            stacked = torch.stack(values)  # (steps, 2)
            if self.accelerator.num_processes > 1:
                stacked = self.accelerator.gather(stacked)  # process after process
            stacked = stacked.reshape(-1, len(steps), 2).cpu()  # (processes, steps, 2)
            bad = ~torch.isfinite(stacked)
            if bool(bad.any()):
                i = int(bad.any(dim=2).any(dim=0).nonzero()[0, 0])
                column = 0 if bool(bad[:, i, 0].any()) else 1
                value = float(stacked[bad[:, i, column], i, column][0])
                what = "the loss" if column == 0 else "the gradient norm"
                raise self.fail(what, value, steps[i])
        if model is not None:
            from prefnoise.reward.validate import first_nonfinite_parameter

            broken = first_nonfinite_parameter(self.accelerator.unwrap_model(model))
            if self.accelerator.num_processes > 1:  # FSDP: each process holds (and checked) its own shard
                from accelerate.utils import gather_object

                broken = next((name for name in gather_object([broken]) if name is not None), None)
            if broken is not None:
                raise self.fail(f"weight {broken!r}", None, self.last_step, after=True)


Compute = Callable[[Any], tuple[torch.Tensor, torch.Tensor, Any]]


class Trainer:
    """Optimizer steps over micro-batches, the same for every model prefnoise trains.

    ``compute(micro_batch)`` returns (objective, per-row losses, anything else); the objective of a
    micro-batch is divided by its divisor before backward, gradients are accumulated over the step's
    micro-batches (synchronised across processes on the last one only), clipped to
    ``max_grad_norm`` (0: not clipped), and the optimizer steps at :func:`learning_rate`.
    """

    def __init__(self, accelerator, model: torch.nn.Module, *, lr: float, weight_decay: float, schedule: str,
                 warmup_steps: int, total_steps: int, max_grad_norm: float, fail: Fail) -> None:
        if schedule not in SCHEDULES:
            raise PrefnoiseError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
        self.accelerator = accelerator
        self.lr, self.schedule, self.warmup_steps, self.total_steps = lr, schedule, warmup_steps, total_steps
        self.max_grad_norm = max_grad_norm
        optimizer = adamw(model, lr, weight_decay)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.watch = DivergenceWatch(accelerator, fail)
        self.last_grad_norm: torch.Tensor | None = None

    def learning_rate(self, step: int) -> float:
        """This run's learning rate at optimizer step ``step`` (0-based)."""
        return learning_rate(step, self.total_steps, self.lr, self.schedule, self.warmup_steps)

    def step(self, step: int, micro_batches: Sequence[Any], compute: Compute,
             divisors: Sequence[float] | None = None) -> tuple[list[torch.Tensor], list[Any]]:
        """Take optimizer step ``step`` (0-based) over ``micro_batches``; return per micro-batch its
        detached per-row losses and what ``compute`` returned besides."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(step)
        divisors = divisors if divisors is not None else [len(micro_batches)] * len(micro_batches)
        losses, extras = [], []
        last = len(micro_batches) - 1
        for i, (batch, divisor) in enumerate(zip(micro_batches, divisors, strict=True)):
            with contextlib.nullcontext() if i == last else self.accelerator.no_sync(self.model):
                objective, rows, extra = compute(batch)
                self.accelerator.backward(objective / divisor if divisor != 1 else objective)
            losses.append(rows.detach())
            extras.append(extra)
        grad_norm = None
        if self.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a DTensor
                grad_norm = grad_norm.full_tensor()
        self.last_grad_norm = grad_norm
        self.watch.note(step, losses, grad_norm)  # on the device: no sync here
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses, extras


def reshard(model: torch.nn.Module) -> None:
    """Under FSDP2, free the gathered weights an evaluation forward (no backward) leaves behind, so that
    a later ``state_dict`` or checkpoint sees sharded parameters; nothing otherwise."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class MetricsLog:
    """``metrics.jsonl`` of a run (main process only), each record also sent to the trackers."""

    def __init__(self, accelerator, path: Path | None, *, report_to: str = "none",
                 on_log: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.accelerator, self.path, self.report_to, self.on_log = accelerator, path, report_to, on_log
        self.records: list[dict[str, Any]] = []

    def __call__(self, record: dict[str, Any]) -> None:
        """Append ``record`` (a dict with ``split`` and ``step``)."""
        self.records.append(record)
        if self.accelerator.is_main_process:
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
            if self.report_to != "none":
                split = record.get("split", "train")
                values = {f"{split}/{k}": v for k, v in record.items()
                          if k not in ("split", "step") and isinstance(v, int | float) and not isinstance(v, bool)}
                self.accelerator.log(values, step=int(record["step"]))
        if self.on_log is not None:
            self.on_log(record)


# --- checkpoints ----------------------------------------------------------------------------------

def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete ``step-N`` directory under ``checkpoints``, or None."""
    done = [p for p in checkpoints.glob("step-*") if (p / TRAINER_STATE).is_file()] \
        if checkpoints.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(accelerator, checkpoints: Path, step: int, state: dict[str, Any],
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Save model, optimizer and every process's RNG state at ``step``, with ``state`` (options,
    fingerprints, loop counters) in trainer.json; keep only the newest checkpoint.

    ``extra(directory)`` (main process) writes anything else the run needs to resume exactly.
    """
    final = checkpoints / f"step-{step:08d}"
    staging = checkpoints / f".staging-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=False)
    if accelerator.is_main_process:
        if extra is not None:
            extra(staging)
        (staging / TRAINER_STATE).write_text(json.dumps({"step": step, **state}, indent=2, default=str))
        staging.rename(final)  # a checkpoint is complete once it has its final name
        for old in checkpoints.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer.json of ``checkpoint``; PrefnoiseError if it is unreadable."""
    path = checkpoint / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict) \
                or not isinstance(state.get("step"), int):
            raise ValueError("no step or config")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PrefnoiseError(f"--resume: {path} is damaged ({exc}); start over with --overwrite") from exc
    return state


def changed_options(saved: dict[str, Any], now: dict[str, Any], free: Sequence[str],
                    legacy: dict[str, Any] | None = None) -> list[str]:
    """The options (flag names) of ``now`` that differ from a checkpoint's ``saved`` ones, leaving out
    those in ``free`` (they do not change the result); ``legacy``: values of options a checkpoint
    written before they existed ran with."""
    legacy = legacy or {}
    return ["--" + name.replace("_", "-") for name, value in now.items()
            if name not in free and saved.get(name, legacy.get(name)) != value]


def truncate_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Drop metrics records logged after ``step`` (they will be logged again); return those kept."""
    if not path.is_file():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [record for record in kept if record["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
    return kept
