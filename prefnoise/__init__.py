"""prefnoise: inject, measure and survive label noise in preference datasets.

The library behind the ``prefnoise`` command: one call per subcommand, with the CLI's option names,
on polars, pandas, pyarrow, ``datasets.Dataset`` tables or paths (see :mod:`prefnoise.api`)::

    import prefnoise as pn
    noisy = pn.corrupt("sample_data/pairs.parquet", rate=0.2, seed=0).table
    train, test = pn.split(noisy, test_fraction=0.2)
    fit = pn.fit_reward(train, loss="ramp")
    report = pn.rank_check(pn.score(fit, test).table)
    print(report.summary["overall"]["agreement"])

The building blocks stay public too (``pn.read_table``, ``pn.corrupt_frame``, ``pn.rank_report``, ...).
Names are imported on first use, so ``import prefnoise`` stays fast (torch loads only when a model
function is touched).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

from prefnoise.errors import PrefnoiseError  # noqa: E402

_EXPORTS = {
    "prefnoise.api": (
        "as_polars",
        "compare_losses",
        "corrupt",
        "split",
        "fit_reward",
        "align",
        "score",
        "rank_check",
        "ComparisonResult",
        "reproduce",
        "corrupt_frame",
        "audit",
        "CorruptResult",
        "SplitResult",
        "FitRewardResult",
        "ScoreResult",
        "RankCheckResult",
        "ReproduceResult",
        "AuditResult",
        "AlignResult",
    ),
    "prefnoise.data": ("ColumnMap", "open_source", "read_table", "write_table", "read_history", "new_history_entry"),
    "prefnoise.options": (
        "CorruptOptions",
        "SplitOptions",
        "ScoreOptions",
        "RankCheckOptions",
        "ReproduceSyntheticOptions",
        "ReproduceAlignmentOptions",
        "OptionError",
    ),
    "prefnoise.noise": ("NoiseSpec", "corrupt_batches", "flip_mask", "uniform_draws"),
    "prefnoise.losses": ("MARGIN_LOSSES", "POLICY_LOSSES", "margin_loss", "preference_loss", "implicit_rewards"),
    "prefnoise.reward": (
        "fit_reward_model",
        "load_reward_model",
        "save_reward_model",
        "score_table",
        "score_responses",
    ),
    "prefnoise.metrics": ("rank_report", "pairwise_agreement", "kendall_tau_b", "spearman_rho"),
    "prefnoise.noise_audit": ("estimate_noise_rate", "out_of_fold_margins"),
    "prefnoise.heldout": ("split_table", "mark_seen", "read_training_pairs"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

# ``pn.audit`` and ``pn.align`` are plain functions: the audit library is prefnoise.noise_audit and the
# policy trainer prefnoise.policy, so no module shares their names (the callable-module shim below is inert).
_CALLABLE_MODULES: tuple[str, ...] = ()  # none left: the policy trainer is prefnoise.policy


class _CallableModule(types.ModuleType):
    """A module that, called, runs the prefnoise.api function of its name."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        api = importlib.import_module("prefnoise.api")
        return getattr(api, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


class _Package(types.ModuleType):
    """This package: makes the modules named in _CALLABLE_MODULES callable as the import system binds them."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CALLABLE_MODULES and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
for _name in _CALLABLE_MODULES:  # already imported (e.g. by a submodule of this package)
    if f"{__name__}.{_name}" in sys.modules:
        setattr(sys.modules[__name__], _name, sys.modules[f"{__name__}.{_name}"])


def __getattr__(name: str) -> Any:
    if name in (*_CALLABLE_MODULES, "api", "noise_audit"):
        return importlib.import_module(f"{__name__}.{name}")  # binds (and makes callable) the module
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'prefnoise' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = ["PrefnoiseError", "__version__", *_CALLABLE_MODULES, *_WHERE]


def __dir__() -> list[str]:
    """The public API (what ``__all__`` lists), known before any name is first used, and the submodules."""
    return sorted({*globals(), *__all__, "api"})
