"""Other annotators' votes on a table's pairs: the accepted encodings, one column each or a long table.

A vote is said relative to the table's own orientation: ``"chosen"`` (or 1, or true) prefers the
response in ``chosen``, ``"rejected"`` (or −1, or false) the one in ``rejected``, ``"tie"`` (or 0)
neither; null means the annotator did not see the pair. Strings are read case-insensitively after
stripping spaces. Anything else is an error naming the column and the first bad row (1-based).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError

# Vote codes, relative to the table's orientation; MISSING marks a pair the annotator did not vote on.
CHOSEN, REJECTED, TIE, MISSING = 0, 1, 2, 3
ENCODINGS = "'chosen'/'rejected'/'tie', 1/-1/0 or true/false (true prefers chosen), null when not annotated"
_WORDS = {"chosen": CHOSEN, "rejected": REJECTED, "tie": TIE,
          # the numbers and booleans as text: a CSV column with one stray value is read as strings
          "1": CHOSEN, "-1": REJECTED, "0": TIE, "1.0": CHOSEN, "-1.0": REJECTED, "0.0": TIE,
          "true": CHOSEN, "false": REJECTED}
_NUMBERS = {1.0: CHOSEN, -1.0: REJECTED, 0.0: TIE}

# The long table of votes (--votes FILE): one row per vote.
VOTE_PAIR, VOTE_ANNOTATOR, VOTE = C.PAIR_ID, "annotator", "vote"


def _bad(column: str, row: int, value: object, where: str = "") -> PrefnoiseError:
    return PrefnoiseError(
        f"{where}column {column!r}, row {row + 1}: vote {value!r} is not an accepted vote; use {ENCODINGS}"
    )


def vote_codes(values: pl.Series, column: str, *, where: str = "") -> np.ndarray:
    """One annotator's votes as codes (CHOSEN, REJECTED, TIE, MISSING); a PrefnoiseError naming
    ``column`` and the first row whose value is not an accepted vote (``where`` prefixes the message)."""
    dtype = values.dtype
    missing = values.is_null().to_numpy()
    codes = np.full(values.len(), MISSING, dtype=np.int8)
    if dtype == pl.Boolean:
        codes[~missing] = np.where(values.drop_nulls().to_numpy(), CHOSEN, REJECTED)
        return codes
    if dtype.is_numeric():
        numbers = values.cast(pl.Float64).to_numpy()
        for number, code in _NUMBERS.items():
            codes[~missing & (numbers == number)] = code
    elif dtype in (pl.String, pl.Categorical, pl.Enum):
        words = values.cast(pl.String).str.strip_chars().str.to_lowercase()
        for word, code in _WORDS.items():
            codes[(words == word).fill_null(False).to_numpy()] = code
    elif dtype != pl.Null:
        raise PrefnoiseError(f"{where}column {column!r} has type {dtype}; votes must be {ENCODINGS}")
    bad = np.flatnonzero(~missing & (codes == MISSING))
    if bad.size:
        raise _bad(column, int(bad[0]), values[int(bad[0])], where)
    return codes


def annotator_columns(frame: pl.DataFrame, names: list[str]) -> np.ndarray:
    """The (pairs × annotators) vote codes of the columns ``names``: each must exist, hold only
    accepted votes and have at least one."""
    if not names:
        raise PrefnoiseError("--annotators needs at least one column")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise PrefnoiseError(f"--annotators names column {duplicated[0]!r} twice")
    for name in names:
        if name not in frame.columns:
            raise PrefnoiseError(f"--annotators: column {name!r} not found; the table has {C.name_list(frame.columns)}")
        if name in (C.PAIR_ID, C.PROMPT, C.CHOSEN, C.REJECTED):
            raise PrefnoiseError(f"--annotators: column {name!r} is part of the pair, not a vote")
    codes = np.stack([vote_codes(frame[name], name) for name in names], axis=1)
    _require_votes(codes, names)
    return codes


def _require_votes(codes: np.ndarray, names: list[str]) -> None:
    empty = [name for name, column in zip(names, codes.T) if (column == MISSING).all()]
    if empty:
        raise PrefnoiseError(
            f"annotator column {empty[0]!r} has no vote on any pair (every row is null); "
            "drop it or give a column with votes"
        )


def long_votes(votes: pl.DataFrame, pair_ids: pl.Series, *, source: str = "--votes") -> tuple[list[str], np.ndarray]:
    """Annotator names and the (pairs × annotators) vote codes from a long table (pair_id, annotator,
    vote), aligned with ``pair_ids``; pair_ids the table lacks and repeated votes are errors."""
    missing = [c for c in (VOTE_PAIR, VOTE_ANNOTATOR, VOTE) if c not in votes.columns]
    if missing:
        raise PrefnoiseError(
            f"{source}: column {missing[0]!r} not found; a votes table has columns {VOTE_PAIR}, {VOTE_ANNOTATOR}, "
            f"{VOTE} (it has {C.name_list(votes.columns)})"
        )
    if votes.height == 0:
        raise PrefnoiseError(f"{source}: the votes table has no rows")
    codes = vote_codes(votes[VOTE], VOTE, where=f"{source}: ")
    ids = votes[VOTE_PAIR].cast(pl.String)
    for name in (VOTE_PAIR, VOTE_ANNOTATOR):
        nulls = votes[name].is_null().arg_true()
        if nulls.len():
            raise PrefnoiseError(f"{source}: column {name!r}, row {int(nulls[0]) + 1}: empty")
    index = {pid: i for i, pid in enumerate(pair_ids.cast(pl.String).to_list())}
    rows = np.array([index.get(pid, -1) for pid in ids.to_list()], dtype=np.int64)
    unknown = np.flatnonzero(rows < 0)
    if unknown.size:
        first = int(unknown[0])
        raise PrefnoiseError(
            f"{source}: column {VOTE_PAIR!r}, row {first + 1}: pair_id {ids[first]!r} is not in the table "
            f"({unknown.size} votes name unknown pairs); votes must name the table's pair_ids"
        )
    names, which = np.unique(votes[VOTE_ANNOTATOR].cast(pl.String).to_numpy(), return_inverse=True)
    matrix = np.full((pair_ids.len(), names.size), MISSING, dtype=np.int8)
    cell = rows * names.size + which
    _, first_seen, seen_count = np.unique(cell, return_index=True, return_counts=True)
    if (seen_count > 1).any():
        repeated = cell[first_seen[np.flatnonzero(seen_count > 1)[0]]]
        row = int(np.flatnonzero(cell == repeated)[1])
        raise PrefnoiseError(
            f"{source}: row {row + 1}: annotator {names[which[row]]!r} votes twice on pair_id {ids[row]!r}; "
            "keep one vote per annotator and pair"
        )
    matrix[rows, which] = codes
    return [str(n) for n in names], matrix


def position_codes(values: pl.Series, column: str) -> np.ndarray:
    """Which response was shown first, per pair: True when ``chosen`` was (``"chosen"``/1/true),
    False when ``rejected`` was; ties and nulls are errors naming the first bad row."""
    codes = vote_codes(values, column, where="--position-col: ")
    bad = np.flatnonzero((codes == TIE) | (codes == MISSING))
    if bad.size:
        row = int(bad[0])
        raise PrefnoiseError(
            f"--position-col: column {column!r}, row {row + 1}: {values[row]!r} does not say which response was "
            "shown first; use 'chosen'/'rejected', 1/-1 or true/false on every row"
        )
    return codes == CHOSEN
