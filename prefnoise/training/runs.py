"""What a run leaves in its directory: the metrics log and checkpoints (save, find, read, compare)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefnoise.atomic import atomic_write_text
from prefnoise.errors import PrefnoiseError

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer.json"


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


def check_resumable(out: str | Path, state: str, command: str) -> None:
    """PrefnoiseError when ``--resume`` would replace the earlier ``command`` run in ``out`` (``state`` 'ours')
    because it left no checkpoint to continue: only --overwrite replaces a run. A new or empty ``out`` starts
    a new run (an interruption before the first checkpoint leaves nothing to continue)."""
    if state == "ours" and latest_checkpoint(Path(out) / CHECKPOINTS_DIR) is None:
        raise PrefnoiseError(f"--resume: --out {out} holds an earlier `prefnoise {command}` run with no checkpoint "
                             "to continue (--save-every N writes them); pass --overwrite to replace it, or give a "
                             "new directory")


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
