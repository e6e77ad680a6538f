"""Where the benchmarks find the shared real data: ``shared/data/real`` beside the repository root.

The scripts are run as ``python bench/NAME.py`` from any checkout laid out as ``<dir>/<checkout>`` next
to ``<dir>/shared``; each script's ``--data``-style option points elsewhere.
"""

from __future__ import annotations

from pathlib import Path

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
ULTRAFEEDBACK_TRAIN = REAL_DATA / "ultrafeedback-binarized-trl-train1000.jsonl.gz"
