"""prefnoise: inject, measure and survive label noise in preference datasets.

The library behind the ``prefnoise`` command: every subcommand is a thin layer over the
functions importable from here (data layer, noise models, losses, reward models, rank metrics,
SymPO alignment).
"""

from __future__ import annotations

__version__ = "0.1.0"

from prefnoise.errors import PrefnoiseError  # noqa: E402

__all__ = ["PrefnoiseError", "__version__"]
