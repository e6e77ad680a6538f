"""``score``'s options: how a reward model scores a table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefnoise.options.ranges import Options


@dataclass(frozen=True)
class ScoreOptions(Options):
    """``prefnoise score``: score pairs (or, with ``responses``, a long table of (prompt, response) rows)
    ``batch_size`` responses per forward pass on ``device`` (auto, cpu or cuda); ``cache_dir`` holds an
    embed+mlp model's embedding cache."""

    responses: bool = False
    batch_size: int | None = None
    device: str = "auto"
    cache_dir: str | Path | None = None
