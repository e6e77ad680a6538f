"""The canonical form of one batch: mapped columns, the HH and conversational layouts split,
types coerced, content pair ids, and invalid rows refused or dropped."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from prefnoise import columns as C
from prefnoise.data.conversational import from_conversational, is_conversational
from prefnoise.data.mapping import ColumnMap, apply_column_map
from prefnoise.data.schema import drop_internal
from prefnoise.errors import PrefnoiseError

LAYOUTS = ("auto", "hh")


HH_ASSISTANT = "\n\nAssistant:"


def content_pair_ids(prompts: Iterable[str], chosens: Iterable[str], rejecteds: Iterable[str]) -> list[str]:
    """Stable 16-hex-digit ids: a content hash of (prompt, chosen, rejected), independent of order."""
    ids = []
    for fields in zip(prompts, chosens, rejecteds):
        digest = hashlib.blake2b(digest_size=8)
        for text in fields:
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        ids.append(digest.hexdigest())
    return ids


def content_pair_id_column(prompts: pl.Series, chosens: pl.Series, rejecteds: pl.Series) -> pl.Series:
    """:func:`content_pair_ids` of three text columns (null read as empty text), as a ``pair_id`` Series.

    The same digests, with the per-row work cut to one blake2b call: each row's length-prefixed
    fields are joined by Arrow kernels first, and the digests are turned to hex with numpy."""
    fields = []
    for texts in (prompts, chosens, rejecteds):
        array = texts.fill_null("").to_arrow().cast(pa.large_binary())
        array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
        n = len(array)
        lengths = np.diff(np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset : array.offset + n + 1])
        prefix_offsets = pa.py_buffer(np.arange(n + 1, dtype=np.int64) * 8)
        prefixes = pa.Array.from_buffers(
            pa.large_binary(), n, [None, prefix_offsets, pa.py_buffer(lengths.astype("<u8"))]
        )
        fields += [prefixes, array]
    joined = pc.binary_join_element_wise(*fields, pa.scalar(b"", pa.large_binary()))
    n = len(joined)
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int64)[joined.offset : joined.offset + n + 1]
    if n == 0:
        return pl.Series(C.PAIR_ID, [], dtype=pl.String)
    data, blake2b, starts, ends = memoryview(joined.buffers()[2]), hashlib.blake2b, offsets[:-1], offsets[1:]
    digests = b"".join([blake2b(data[a:b], digest_size=8).digest() for a, b in zip(starts.tolist(), ends.tolist())])
    raw = np.frombuffer(digests, dtype=np.uint8)
    hex_text = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[np.stack([raw >> 4, raw & 15], axis=1).ravel()]
    hex_offsets = pa.py_buffer(np.arange(n + 1, dtype=np.int64) * 16)
    ids = pa.Array.from_buffers(pa.large_string(), n, [None, hex_offsets, pa.py_buffer(hex_text)])
    return pl.Series(C.PAIR_ID, ids, dtype=pl.String)


def canonicalize(
    frame: pl.DataFrame,
    *,
    columns: ColumnMap | None = None,
    layout: str = "auto",
    drop_invalid: bool = False,
    name: str = "<table>",
    row_offset: int = 0,
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Map, split and validate one batch into the canonical schema; return it and drop counts."""
    columns = columns or ColumnMap()
    reserved = [c for c in frame.columns if c.startswith("__")]  # internal names; never written (pandas' index too)
    frame = frame.drop(reserved) if reserved else frame
    frame = apply_column_map(frame, columns, name)
    frame = frame.with_row_index("__row", offset=row_offset + 1)
    invalid: dict[str, pl.Expr] = {}
    if is_conversational(frame, name):
        frame, broken, mismatch = from_conversational(frame, name)
        invalid["a message without role or content"] = broken
        invalid["conversation prefixes differ"] = mismatch
    elif layout == "hh":
        frame, mismatch = _split_shared_prefix(frame, name)
        invalid["transcript prefixes differ"] = mismatch
    _check_required(frame, name, columns)
    frame = _coerce_types(frame, name)
    if C.PAIR_ID not in frame.columns:
        frame = frame.with_columns(content_pair_id_column(frame[C.PROMPT], frame[C.CHOSEN], frame[C.REJECTED]))
    for column in C.REQUIRED:
        text = pl.col(column)
        invalid[f"null or empty '{column}'"] = text.is_null() | (text.str.strip_chars() == "")
    invalid["'chosen' equals 'rejected'"] = pl.col(C.CHOSEN) == pl.col(C.REJECTED)
    invalid["null 'pair_id'"] = pl.col(C.PAIR_ID).is_null()
    dropped: dict[str, int] = {}
    flags = frame.select(**{reason: expr.fill_null(False) for reason, expr in invalid.items()})
    bad_any = pl.Series("bad", [False] * frame.height)
    for reason in flags.columns:
        mask = flags[reason] & ~bad_any  # count each row once, under its first reason
        n_bad = int(mask.sum())
        if n_bad == 0:
            continue
        if not drop_invalid:
            rows = frame.filter(mask).head(3)
            where = ", ".join(f"row {r} (pair_id {p})" for r, p in zip(rows["__row"], rows[C.PAIR_ID]))
            raise PrefnoiseError(
                f"{name}: {n_bad} row(s) with {reason}, first at {where}; fix them or pass "
                "--drop-invalid to skip such rows"
            )
        dropped[reason] = n_bad
        bad_any = bad_any | mask
    if dropped:
        frame = frame.filter(~bad_any)
    return _order_columns(drop_internal(frame)), dropped


def _check_required(frame: pl.DataFrame, name: str, columns: ColumnMap) -> None:
    missing = [c for c in C.REQUIRED if c not in frame.columns]
    if not missing:
        return
    hint = "map yours with --prompt-col/--chosen-col/--rejected-col"
    if missing == [C.PROMPT] and C.CHOSEN in frame.columns:
        sample = frame[C.CHOSEN].head(5)
        if sample.dtype == pl.String and sample.str.contains(HH_ASSISTANT, literal=True).any():
            hint = "chosen/rejected look like full transcripts: split them with --layout hh"
    raise PrefnoiseError(
        f"{name}: missing required column(s) {', '.join(repr(m) for m in missing)}; "
        f"columns are: {C.name_list(c for c in frame.columns if c != '__row')}; {hint}"
    )


def _coerce_types(frame: pl.DataFrame, name: str) -> pl.DataFrame:
    casts = []
    for column in C.REQUIRED:
        dtype = frame.schema[column]
        if dtype == pl.String:
            continue
        if dtype in (pl.Categorical, pl.Null) or isinstance(dtype, pl.Enum):
            casts.append(pl.col(column).cast(pl.String))
        else:
            raise PrefnoiseError(f"{name}: column {column!r} has type {dtype}; expected text (strings)")
    if C.PAIR_ID in frame.columns and frame.schema[C.PAIR_ID] != pl.String:
        dtype = frame.schema[C.PAIR_ID]
        if not (dtype.is_integer() or dtype in (pl.Categorical, pl.Null) or isinstance(dtype, pl.Enum)):
            raise PrefnoiseError(
                f"{name}: column 'pair_id' has type {dtype}; expected text or integer ids "
                "(or drop the column and prefnoise computes content ids)"
            )
        casts.append(pl.col(C.PAIR_ID).cast(pl.String))
    if C.FLIPPED in frame.columns and frame.schema[C.FLIPPED] != pl.Boolean:
        if not frame.schema[C.FLIPPED].is_integer():
            raise PrefnoiseError(f"{name}: column 'flipped' has type {frame.schema[C.FLIPPED]}; expected booleans")
        casts.append(pl.col(C.FLIPPED).cast(pl.Boolean))
    return frame.with_columns(casts) if casts else frame


def _order_columns(frame: pl.DataFrame) -> pl.DataFrame:
    first = [C.PAIR_ID, *C.REQUIRED]
    return frame.select(first + [c for c in frame.columns if c not in first])


def _split_shared_prefix(frame: pl.DataFrame, name: str) -> tuple[pl.DataFrame, pl.Expr]:
    """Anthropic HH layout, split as TRL's ``extract_prompt`` does, at a turn boundary.

    The prompt is the longest common prefix of the two transcripts, cut back to its last
    '\\n\\nAssistant:' (which the prompt keeps); each response is the rest of its transcript,
    leading space included, so ``prompt + chosen`` and ``prompt + rejected`` rebuild the originals
    byte for byte. TRL's ``extract_prompt`` takes the character-level common prefix, which on raw
    HH strings can end inside the final reply (both replies start "I ..."); cutting it back to the
    last assistant marker gives the same prompt whenever TRL's ends at one. Transcripts whose final
    turns differ in number (one reply continues the dialogue) keep the shared turns as the prompt,
    as TRL does; only pairs with no common prefix ending in '\\n\\nAssistant:' are invalid.
    """
    if C.PROMPT in frame.columns:
        raise PrefnoiseError(f"{name}: --layout hh expects no 'prompt' column, but one exists")
    for column in (C.CHOSEN, C.REJECTED):
        if column not in frame.columns or frame.schema[column] != pl.String:
            raise PrefnoiseError(f"{name}: --layout hh needs text columns 'chosen' and 'rejected'")
    prompts, chosens, rejecteds = [], [], []
    for chosen, rejected in zip(frame[C.CHOSEN].to_list(), frame[C.REJECTED].to_list()):
        cut = hh_prompt_length(chosen, rejected)
        if cut is None:
            prompts.append(None)
            chosens.append(chosen)
            rejecteds.append(rejected)
        else:
            prompts.append(chosen[:cut])
            chosens.append(chosen[cut:])
            rejecteds.append(rejected[cut:])
    frame = frame.with_columns(
        pl.Series(C.PROMPT, prompts, dtype=pl.String),
        pl.Series(C.CHOSEN, chosens, dtype=pl.String),
        pl.Series(C.REJECTED, rejecteds, dtype=pl.String),
    )
    frame = frame.with_columns(pl.col(C.PROMPT).is_null().alias("__mismatch"))
    return frame, pl.col("__mismatch")


def hh_prompt_length(chosen: str | None, rejected: str | None) -> int | None:
    """Length of the HH prompt of a transcript pair: their longest common prefix cut back to the end
    of its last '\\n\\nAssistant:'; None when either is null or the common prefix has none."""
    if chosen is None or rejected is None:
        return None
    # fast path: one transcript's last-assistant prefix is a prefix of the other
    for first, second in ((chosen, rejected), (rejected, chosen)):
        at = first.rfind(HH_ASSISTANT)
        if at >= 0 and second.startswith(first[: at + len(HH_ASSISTANT)]):
            return at + len(HH_ASSISTANT)
    common = os.path.commonprefix([chosen, rejected])
    at = common.rfind(HH_ASSISTANT)
    return at + len(HH_ASSISTANT) if at >= 0 else None
