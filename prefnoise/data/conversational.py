"""TRL's conversational format (lists of {role, content} messages) read into the canonical text
columns and written back losslessly."""

from __future__ import annotations

import json
from typing import Any

import polars as pl
import pyarrow as pa

from prefnoise import columns as C
from prefnoise.data.schema import first_error_line
from prefnoise.errors import PrefnoiseError

MESSAGE_COLUMNS = (
    (C.PROMPT_MESSAGES, C.PROMPT),
    (C.chosen(C.MESSAGES), C.CHOSEN),
    (C.rejected(C.MESSAGES), C.REJECTED),
)


def _is_messages(dtype: pl.DataType | None) -> bool:
    return isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)


def is_conversational(frame: pl.DataFrame, name: str = "<table>") -> bool:
    """Whether the batch is in TRL's conversational format; PrefnoiseError when it mixes messages
    (lists of {role, content}) with plain text, or its messages are not text."""
    kinds = {c: frame.schema[c] for c in C.REQUIRED if c in frame.columns}
    holding = [c for c, dtype in kinds.items() if _is_messages(dtype)]
    if not holding or C.CHOSEN not in kinds or C.REJECTED not in kinds:
        return False  # a missing column is reported by _check_required
    if any(not _is_messages(dtype) and dtype != pl.Null for dtype in kinds.values()):
        described = "; ".join(
            f"{c!r} holds {'messages' if c in holding else 'plain text' if kinds[c] == pl.String else kinds[c]}"
            for c in kinds
        )
        raise PrefnoiseError(
            f"{name}: columns mix conversational messages (lists of {{role, content}}) with other values "
            f"({described}); give 'chosen' and 'rejected' (and 'prompt', if present) all as messages or all as text"
        )
    for column in holding:
        fields = {f.name: f.dtype for f in kinds[column].inner.fields}  # type: ignore[union-attr]
        for key in ("role", "content"):
            if key in fields and fields[key] not in (pl.String, pl.Null):
                raise PrefnoiseError(
                    f"{name}: messages in column {column!r} have {key!r} of type {fields[key]}; expected text "
                    "(multimodal or structured content is not supported; flatten it to a string)"
                )
    return True


def _render_messages(messages: list[dict[str, Any]]) -> str:
    return "\n\n".join(f"{m.get('role') or ''}: {m.get('content') or ''}" for m in messages)


def _response_text(messages: list[dict[str, Any]]) -> str:
    if len(messages) == 1:
        return str(messages[0].get("content") or "")
    return _render_messages(messages)


def _broken_messages(*lists: list[Any]) -> bool:
    """Whether any message is null or lacks its role or content."""
    return any(m is None or m.get("role") is None or m.get("content") is None for msgs in lists for m in msgs)


def from_conversational(frame: pl.DataFrame, name: str) -> tuple[pl.DataFrame, pl.Expr, pl.Expr]:
    """TRL's conversational format: lists of {role, content}, explicit or implicit prompt.

    The text columns hold the rendered prompt and the response text; the messages themselves are
    kept losslessly as JSON in ``prompt_messages``, ``chosen_messages`` and ``rejected_messages``
    (the latter two swap with their response on a flip), from which :func:`write_table` writes the
    table back in TRL's explicit-prompt conversational format.
    Returns the frame and the masks of rows with a broken message and with differing prefixes."""
    chosen_lists = frame[C.CHOSEN].to_list()
    rejected_lists = frame[C.REJECTED].to_list()
    explicit = C.PROMPT in frame.columns and _is_messages(frame.schema[C.PROMPT])
    prompt_lists = frame[C.PROMPT].to_list() if explicit else [None] * frame.height
    prompts, prompt_json, chosen, rejected, mismatch, broken = [], [], [], [], [], []
    chosen_json, rejected_json = [], []
    for prompt, chosen_msgs, rejected_msgs in zip(prompt_lists, chosen_lists, rejected_lists):
        chosen_msgs, rejected_msgs = chosen_msgs or [], rejected_msgs or []
        bad = _broken_messages(prompt or [], chosen_msgs, rejected_msgs)
        broken.append(bad)
        if bad:
            chosen_msgs, rejected_msgs, prompt = [m for m in chosen_msgs if m], [m for m in rejected_msgs if m], []
        if prompt is None:
            prompt = chosen_msgs[:-1]
            differs = prompt != rejected_msgs[:-1]
            chosen_msgs, rejected_msgs = chosen_msgs[-1:], rejected_msgs[-1:]
        else:
            differs = False
        mismatch.append(differs)
        prompts.append(_render_messages(prompt))
        prompt_json.append(json.dumps(prompt, ensure_ascii=False, default=str))
        chosen.append(_response_text(chosen_msgs))
        rejected.append(_response_text(rejected_msgs))
        chosen_json.append(json.dumps(chosen_msgs, ensure_ascii=False, default=str))
        rejected_json.append(json.dumps(rejected_msgs, ensure_ascii=False, default=str))
    frame = frame.with_columns(
        pl.Series(C.PROMPT, prompts, dtype=pl.String),
        pl.Series(C.PROMPT_MESSAGES, prompt_json, dtype=pl.String),
        pl.Series(C.chosen(C.MESSAGES), chosen_json, dtype=pl.String),
        pl.Series(C.rejected(C.MESSAGES), rejected_json, dtype=pl.String),
        pl.Series(C.CHOSEN, chosen, dtype=pl.String),
        pl.Series(C.REJECTED, rejected, dtype=pl.String),
        pl.Series("__broken", broken, dtype=pl.Boolean),
        pl.Series("__mismatch", mismatch, dtype=pl.Boolean),
    )
    return frame, pl.col("__broken"), pl.col("__mismatch")


def carries_messages(columns: list[str]) -> bool:
    """Whether a canonical table with ``columns`` holds a conversational table's JSON message columns (it is
    then written back in TRL's conversational format)."""
    return all(helper in columns for helper, _ in MESSAGE_COLUMNS)


def to_conversational(table: pa.Table, message_types: dict[str, pa.DataType]) -> pa.Table:
    """``table`` with its JSON message columns turned back into TRL's conversational columns
    (``prompt``, ``chosen``, ``rejected`` as lists of message structs) and dropped; unchanged when
    it lacks any of them. ``message_types`` holds each column's list type, fixed by the first batch
    so every batch of one file gets the same schema."""
    if not carries_messages(table.column_names):
        return table
    for helper, column in MESSAGE_COLUMNS:
        values = [None if raw is None else json.loads(raw) for raw in table.column(helper).to_pylist()]
        if column not in message_types:
            message_types[column] = _message_list_type(values)
        target = message_types[column]
        known = {f.name for f in target.value_type}
        extra = {k for msgs in values for m in msgs or [] if isinstance(m, dict) for k in m} - known
        if extra:
            raise PrefnoiseError(
                f"messages in {column!r} gain field(s) {', '.join(sorted(map(repr, extra)))} part-way "
                "through the table; give every message the same fields"
            )
        try:
            array = pa.array(values, type=target)
        except (pa.ArrowException, TypeError, ValueError) as error:
            raise PrefnoiseError(f"cannot write the {column!r} messages: {first_error_line(error)}") from None
        table = table.set_column(table.column_names.index(column), column, array)
    return table.drop_columns([helper for helper, _ in MESSAGE_COLUMNS])


def _message_list_type(values: list[Any]) -> pa.DataType:
    """The list-of-struct type of messages ``values``: their fields in first-seen order (role and
    content always, as text), other fields typed from their values (text when all null)."""
    text = ("role", "content")
    keys: list[str] = []
    for msgs in values:
        for message in msgs or []:
            for key in message if isinstance(message, dict) else ():
                if key not in keys:
                    keys.append(key)
    keys += [k for k in text if k not in keys]
    fields = []
    for key in keys:
        if key in text:
            fields.append(pa.field(key, pa.string()))
            continue
        items = [m.get(key) for msgs in values for m in msgs or [] if isinstance(m, dict)]
        inferred = pa.array(items).type
        fields.append(pa.field(key, pa.string() if pa.types.is_null(inferred) else inferred))
    return pa.list_(pa.struct(fields))
