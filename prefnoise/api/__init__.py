"""The Python API: one call per subcommand, with the CLI's option names; the CLI is a thin layer over it.

    import prefnoise as pn

    noisy = pn.corrupt(df, rate=0.2, seed=0).table          # df: polars, pandas, pyarrow, datasets.Dataset or a path
    train, test = pn.split(noisy, test_fraction=0.2)
    fit = pn.fit_reward(train, loss="ramp")                  # .model, .summary
    scored = pn.score(fit, test).table
    report = pn.rank_check(scored)                            # .report, .summary (= `rank-check --json`), .passed
    grid = pn.reproduce("synthetic", quick=True)              # .results, .table, .summary

Each command's options are one frozen object (:mod:`prefnoise.options`, e.g. ``CorruptOptions``), checked
once when built: pass it as ``options=`` or its fields as keywords. Every function takes a table in any
of the accepted forms (see :func:`as_polars`) and the input options ``prompt_col``, ``chosen_col``,
``rejected_col``, ``layout`` and ``drop_invalid`` (plus any further input
option of the CLI, such as ``--chosen-score-col``, by its parameter name). Each returns a small result
object whose ``summary`` is the object the subcommand prints with ``--json``. Passing an output path
(``out``, ``train_out``/``test_out``) writes it as the CLI does (atomically, with provenance, never over a
file prefnoise did not write); without one nothing is written. Bad input raises
:class:`prefnoise.errors.PrefnoiseError` with the one-line message the CLI prints.
"""

from prefnoise.api.aligning import AlignResult, align
from prefnoise.api.auditing import AuditResult, audit
from prefnoise.api.comparing import ComparisonResult, compare_losses
from prefnoise.api.corrupting import CorruptResult, corrupt, corrupt_frame
from prefnoise.api.fitting import FitRewardResult, fit_reward
from prefnoise.api.rank_checking import RankCheckResult, rank_check
from prefnoise.api.reproducing import ReproduceResult, reproduce
from prefnoise.api.scoring import ScoreResult, score
from prefnoise.api.splitting import SplitResult, split
from prefnoise.api.tables import InputTable, as_polars, table_label

__all__ = [
    "AlignResult",
    "AuditResult",
    "ComparisonResult",
    "CorruptResult",
    "FitRewardResult",
    "InputTable",
    "RankCheckResult",
    "ReproduceResult",
    "ScoreResult",
    "SplitResult",
    "align",
    "as_polars",
    "audit",
    "compare_losses",
    "corrupt",
    "corrupt_frame",
    "fit_reward",
    "rank_check",
    "reproduce",
    "score",
    "split",
    "table_label",
]
