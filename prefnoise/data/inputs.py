"""Opening a user's input from the options every table-reading command shares (the CLI's ``--prompt-col``,
``--layout``, ``--split``, ...), with the warnings a person must see routed to the caller."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from prefnoise.data.mapping import ColumnMap
from prefnoise.data.read import PreferenceSource, open_source
from prefnoise.errors import PrefnoiseWarning


def open_input(
    source: str,
    prompt_col: str = "prompt",
    chosen_col: str = "chosen",
    rejected_col: str = "rejected",
    layout: str = "auto",
    drop_invalid: bool = False,
    *,
    warn_history: bool = True,
    warn: Callable[[str], None] | None = None,
    chosen_score_col: str | None = None,
    rejected_score_col: str | None = None,
    split: str | None = None,
    config: str | None = None,
) -> PreferenceSource:
    """Open a preference table from the shared input options (a file, directory, ``-`` or a cached
    hub dataset id).

    When its provenance is unreadable (and ``warn_history``), says so in one message: through
    ``warn`` when given, else as a :class:`~prefnoise.errors.PrefnoiseWarning` (the CLI prints those
    as one ``Warning:`` line on stderr).
    """
    columns = ColumnMap(
        prompt=prompt_col,
        chosen=chosen_col,
        rejected=rejected_col,
        chosen_score=chosen_score_col,
        rejected_score=rejected_score_col,
    )
    src = open_source(source, columns=columns, layout=layout, drop_invalid=drop_invalid, split=split, config=config)
    if warn_history and src.history_error:
        message = f"{src.name}: provenance history unreadable ({src.history_error}); starting a new one"
        if warn is not None:
            warn(message)
        else:
            warnings.warn(message, PrefnoiseWarning, stacklevel=2)
    return src

