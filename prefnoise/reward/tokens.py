"""Token ids of (prompt, response) pairs for the transformer backend: the project's truncation rules,
chat-template rows, padding, and how a message words what was cut."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prefnoise.errors import PrefnoiseError
from prefnoise.hf import check_model_dir, from_pretrained


def load_tokenizer(path: str | Path, what: str) -> Any:
    """The tokenizer saved in model dir ``path``, with a pad token (the eos token when it has none)."""
    from transformers import AutoTokenizer  # heavy: loaded when a tokenizer is

    tokenizer = from_pretrained(AutoTokenizer, path, what=what)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PrefnoiseError(f"{what} {path}: tokenizer has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_reward_model_dir(path: str | Path, what: str) -> Path:
    """``path`` once it is a local HF model directory prefnoise may load (see prefnoise.hf.check_model_dir)."""
    return check_model_dir(path, what)


def _fit_lengths(prompt: int, response: int, room: int) -> tuple[int, int]:
    """How many prompt and response tokens to keep so that both fit in ``room`` tokens.

    The prompt gives way first (it keeps its end, as TRL and ``prefnoise align`` do); the response
    is cut from the right only when it alone is longer than ``room``.
    """
    room = max(room, 0)
    keep_response = min(response, room)
    return min(prompt, room - keep_response), keep_response


def _decoder_head(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS for Llama-style tokenizers, else none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_specials = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_specials[:1] == [bos] and plain[:1] != [bos] else []


def _vanished(row: int, prompt: int, response: int, max_length: int, reserved: int) -> PrefnoiseError:
    return PrefnoiseError(
        f"row {row}: the response ({response} tokens) has no token left within max-length {max_length} "
        f"({reserved} taken by special tokens, prompt {prompt} tokens cut away); raise --max-length"
    )


@contextlib.contextmanager
def _untruncated(backend: Any) -> Iterator[None]:
    """The fast tokenizer ``backend`` with its own truncation and padding switched off, restored after.

    A tokenizer.json may carry both (all-MiniLM-L6-v2's: truncate to 128, pad to 128); the backend
    then pads every prompt and response to 128 tokens before :func:`encode_pairs` cuts them, and cuts
    the pair again in ``post_process``, so a short prompt became 128 pad tokens and the text was lost.
    """
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        yield
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)


def encode_pairs(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], max_length: int
) -> tuple[list[list[int]], dict[str, int]]:
    """Token ids of each (prompt, response), at most ``max_length`` tokens, and truncation counts.

    Prompt and response are tokenized separately. When they do not fit together, the prompt loses
    tokens from the left (it keeps its end, next to the response); the response loses tokens from
    the right only when it alone exceeds the limit. Encoders (tokenizers with a sep token) get a
    proper text pair with the tokenizer's special tokens; decoders get the prompt (after BOS when
    the tokenizer adds one) followed by the response. Sequences are never padded here.

    The counts: ``rows``, ``truncated`` (rows cut at all), ``prompt_truncated`` and
    ``response_truncated``, and ``first_truncated_row`` (-1 when none). A response that had tokens
    and has none left (``max_length`` no larger than the special tokens) raises PrefnoiseError
    naming its row (0-based); such a row cannot be scored faithfully, so it is never dropped silently.
    """
    prompts, responses = list(prompts), list(responses)
    stats = {"rows": len(prompts), "truncated": 0, "prompt_truncated": 0, "response_truncated": 0,
             "first_truncated_row": -1}
    out: list[list[int]] = []

    def count(row: int, cut_prompt: bool, cut_response: bool) -> None:
        stats["prompt_truncated"] += cut_prompt
        stats["response_truncated"] += cut_response
        if cut_prompt or cut_response:
            stats["truncated"] += 1
            if stats["first_truncated_row"] < 0:
                stats["first_truncated_row"] = row

    if not prompts:
        return out, stats
    encoder = getattr(tokenizer, "sep_token", None) is not None
    backend = getattr(tokenizer, "backend_tokenizer", None) if encoder else None
    if backend is not None:  # fast encoder: cut the Encodings, then let the tokenizer add its specials
        with _untruncated(backend):
            reserved = backend.num_special_tokens_to_add(is_pair=True)
            firsts = backend.encode_batch(prompts, add_special_tokens=False)
            seconds = backend.encode_batch(responses, add_special_tokens=False)
            for row, (first, second) in enumerate(zip(firsts, seconds)):
                n_prompt, n_response = len(first.ids), len(second.ids)
                keep_prompt, keep_response = _fit_lengths(n_prompt, n_response, max_length - reserved)
                if n_response and not keep_response:
                    raise _vanished(row, n_prompt, n_response, max_length, reserved)
                if keep_prompt < n_prompt:
                    first.truncate(keep_prompt, direction="left")
                if keep_response < n_response:
                    second.truncate(keep_response, direction="right")
                out.append(list(backend.post_process(first, second, add_special_tokens=True).ids))
                count(row, keep_prompt < n_prompt, keep_response < n_response)
        return out, stats

    def plain(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    head = [] if encoder else _decoder_head(tokenizer)
    reserved = tokenizer.num_special_tokens_to_add(pair=True) if encoder else len(head)
    for row, (first, second) in enumerate(zip(plain(prompts), plain(responses))):
        n_prompt, n_response = len(first), len(second)
        keep_prompt, keep_response = _fit_lengths(n_prompt, n_response, max_length - reserved)
        if n_response and not keep_response:
            raise _vanished(row, n_prompt, n_response, max_length, reserved)
        first, second = first[n_prompt - keep_prompt :], second[:keep_response]
        if encoder:  # a slow (Python) encoder tokenizer
            out.append(list(tokenizer.build_inputs_with_special_tokens(first, second)))
        else:
            out.append(head + first + second)
        count(row, keep_prompt < n_prompt, keep_response < n_response)
    return out, stats


def _chat_ids(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    """``messages`` through the tokenizer's chat template, as TRL's RewardTrainer tokenizes them."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def _common_prefix(ids: Sequence[int], other: Sequence[int]) -> int:
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def uses_chat_template(tokenizer: Any, prompt_messages: Sequence[str | None] | None) -> bool:
    """Whether rows are tokenized with the chat template: the tokenizer has one and every row has
    its prompt messages (the ``prompt_messages`` JSON column that conversational tables carry)."""
    return (
        prompt_messages is not None
        and bool(getattr(tokenizer, "chat_template", None))
        and all(isinstance(m, str) and m != "" for m in prompt_messages)
    )


def encode_chat_pairs(
    tokenizer: Any, prompt_messages: Sequence[str], responses: Sequence[str], max_length: int
) -> tuple[list[list[int]], dict[str, int]]:
    """Token ids of each (prompt messages + assistant response) through the tokenizer's chat template.

    A row that fits in ``max_length`` gets exactly what TRL's RewardTrainer builds for a
    conversational row: ``apply_chat_template(prompt + [assistant response], tokenize=True)``, no
    EOS added. A longer row is split where the prompt rendered with the generation prompt stops
    matching; the prompt part (after a leading BOS, which is kept) loses tokens from the left and the
    response part (the response and the template's end-of-turn tokens) from the right only when it
    alone is too long. ``prompt_messages``: JSON lists of {role, content}. Counts as
    :func:`encode_pairs`.
    """
    stats = {"rows": len(responses), "truncated": 0, "prompt_truncated": 0, "response_truncated": 0,
             "first_truncated_row": -1}
    bos = getattr(tokenizer, "bos_token_id", None)
    out: list[list[int]] = []
    for row, (raw, response) in enumerate(zip(prompt_messages, responses)):
        messages = json.loads(raw)
        full = _chat_ids(tokenizer, [*messages, {"role": "assistant", "content": response}])
        if len(full) <= max_length:
            out.append(full)
            continue
        split = _common_prefix(_chat_ids(tokenizer, messages, add_generation_prompt=True), full) if messages else 0
        head = full[:1] if bos is not None and split and full[:1] == [bos] else []
        prompt, answer = full[len(head) : split], full[split:]
        keep_prompt, keep_response = _fit_lengths(len(prompt), len(answer), max_length - len(head))
        if answer and not keep_response:
            raise _vanished(row, len(prompt), len(answer), max_length, len(head))
        out.append(head + prompt[len(prompt) - keep_prompt :] + answer[:keep_response])
        cut_prompt, cut_response = keep_prompt < len(prompt), keep_response < len(answer)
        stats["prompt_truncated"] += cut_prompt
        stats["response_truncated"] += cut_response
        stats["truncated"] += 1
        if stats["first_truncated_row"] < 0:
            stats["first_truncated_row"] = row
    return out, stats


def tokenize_pairs(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], max_length: int
) -> list[list[int]]:
    """Token ids of prompt and response together, at most ``max_length`` tokens (see :func:`encode_pairs`)."""
    return encode_pairs(tokenizer, prompts, responses, max_length)[0]


def describe_truncation(stats: Sequence[dict[str, int]], max_length: int, *, saved: bool = False) -> str | None:
    """One line for the CLI about the rows ``encode_pairs`` had to cut (None when nothing was cut).

    ``stats``: the ``last_truncation`` of each ``prepare`` call (e.g. the chosen and rejected sides);
    ``saved``: the limit is a saved model's (``score``, which has no ``--max-length``), not an option.
    """
    rows = sum(s["rows"] for s in stats)
    cut = sum(s["truncated"] for s in stats)
    if not cut:
        return None
    prompt = sum(s["prompt_truncated"] for s in stats)
    response = sum(s["response_truncated"] for s in stats)
    return (
        f"truncated {cut} of {rows} prompt+response sequences to "
        f"{'the max_length the model was trained with,' if saved else '--max-length'} {max_length} "
        f"({prompt} prompts cut from the left, {response} responses cut from the right)"
    )


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded input_ids and attention_mask for token id lists."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}
