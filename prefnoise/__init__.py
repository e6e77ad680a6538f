"""prefnoise: inject, measure and survive label noise in preference datasets.

The library behind the ``prefnoise`` command; every subcommand is a thin layer over these::

    import prefnoise as pn
    table = pn.read_table("sample_data/pairs.parquet")
    noisy, stats = pn.corrupt_frame(table, pn.NoiseSpec(kind="symmetric", rate=0.2))
    fit = pn.fit_reward_model(noisy, loss="sigmoid")
    report = pn.rank_report(pn.score_table(fit.model, table))

Names are imported on first use, so ``import prefnoise`` stays fast (torch loads only when a model
function is touched).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from prefnoise.errors import PrefnoiseError  # noqa: E402

_EXPORTS = {
    "prefnoise.data": ("ColumnMap", "open_source", "read_table", "write_table", "read_history", "new_history_entry"),
    "prefnoise.noise": ("NoiseSpec", "corrupt_frame", "corrupt_batches", "flip_mask", "uniform_draws"),
    "prefnoise.losses": ("MARGIN_LOSSES", "POLICY_LOSSES", "margin_loss", "preference_loss", "implicit_rewards"),
    "prefnoise.reward": (
        "fit_reward_model",
        "load_reward_model",
        "save_reward_model",
        "score_table",
        "score_responses",
    ),
    "prefnoise.rank": ("rank_report", "pairwise_agreement", "kendall_tau_b", "spearman_rho"),
    "prefnoise.audit": ("estimate_noise_rate", "out_of_fold_margins"),
    "prefnoise.heldout": ("split_table", "mark_seen", "read_training_pairs"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'prefnoise' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = ["PrefnoiseError", "__version__", *_WHERE]
