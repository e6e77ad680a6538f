"""The one training loop of prefnoise: reward models (``fit-reward``, every backend) and policies (``align``).

- :mod:`~prefnoise.training.accelerator`: CPU or CUDA, bf16 autocast where supported, data-parallel (DDP)
  or FSDP under ``accelerate launch``, trackers for ``--report-to``;
- :mod:`~prefnoise.training.trainer`: AdamW (no decay on biases and norms), the learning rate of
  :func:`learning_rate` set before every optimizer step, micro-batches accumulated with a divisor each,
  gradient clipping, and a :class:`DivergenceWatch` that stops a run whose loss, gradient norm or weights
  turn NaN or inf;
- :mod:`~prefnoise.training.runs`: ``metrics.jsonl`` (:class:`MetricsLog`) and checkpoints;
- :mod:`~prefnoise.training.loop`: :func:`fit`, one run of a :class:`Task` (a reward model or a policy);
- :mod:`~prefnoise.training.split`: the stable train/validation split by pair_id.

What differs between the two commands (what a micro-batch is, its loss, when to evaluate) stays with
them; how a step is taken and a run is kept is here only.
"""

from prefnoise.training.accelerator import (
    PRECISIONS,
    REPORT_TO,
    SCHEDULES,
    TRACKER_DIR,
    TRACKER_PACKAGES,
    check_report_to,
    fsdp_requested,
    make_accelerator,
    resolve_device,
    resolve_precision,
    start_trackers,
    tracker_config,
)
from prefnoise.training.finite import first_nonfinite_parameter, nonfinite_name
from prefnoise.training.runs import (
    CHECKPOINTS_DIR,
    METRICS_FILE,
    TRAINER_STATE,
    MetricsLog,
    changed_options,
    latest_checkpoint,
    read_trainer_state,
    save_checkpoint,
    truncate_metrics,
)
from prefnoise.training.split import fold_of_pair_id, split_by_pair_id
from prefnoise.training.trainer import DivergenceWatch, Trainer, adamw, learning_rate, reshard

__all__ = [
    "CHECKPOINTS_DIR", "METRICS_FILE", "PRECISIONS", "REPORT_TO", "SCHEDULES", "TRACKER_DIR", "TRACKER_PACKAGES",
    "TRAINER_STATE", "DivergenceWatch", "MetricsLog", "Trainer", "adamw", "changed_options", "check_report_to",
    "first_nonfinite_parameter", "fold_of_pair_id", "fsdp_requested", "latest_checkpoint", "learning_rate",
    "make_accelerator", "nonfinite_name", "read_trainer_state", "reshard", "resolve_device", "resolve_precision",
    "save_checkpoint", "split_by_pair_id", "start_trackers", "tracker_config", "truncate_metrics",
]
