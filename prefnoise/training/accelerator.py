"""The accelerate set-up of a run: device, precision, data-parallel or FSDP layout, trackers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from prefnoise.errors import PrefnoiseError
from prefnoise.options.training import PRECISIONS, REPORT_TO, SCHEDULES  # noqa: F401  (re-exported)

TRACKER_DIR = "runs"  # --report-to logs, under the output directory
# The package each tracker needs (accelerate imports it when the tracker starts).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}


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
    from accelerate import Accelerator  # heavy: accelerate loads torch.distributed

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
    from accelerate import Accelerator, FullyShardedDataParallelPlugin  # heavy: accelerate
    from accelerate.state import AcceleratorState, PartialState  # heavy: accelerate
    from accelerate.utils import DistributedType  # heavy: accelerate

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
