"""Sequence log-probabilities of responses under a causal LM, and the cached reference pass.

The log-probability of a response is the sum of its token log-probs given the prompt; prompt and
padding tokens are masked out by ``labels_mask``. Pairs are tokenized once, with an explicit
truncation policy: the prompt loses tokens from the left first (down to ``max_prompt_length``),
then responses lose tokens from the right, so that prompt + response fits ``max_length``.

The frozen reference model's log-probs are computed in one batched no-grad pass and stored as
Parquet (``pair_id``, ``content_key``, ``ref_chosen_logp``, ``ref_rejected_logp``) with a
fingerprint of the model files (plus the size and modification time of every weight file), the
tokenization settings (with the run's chat date) and ``LOGPROB_FORMAT_VERSION``; a later run with
the same fingerprint reads them back (rows match on pair_id and on a hash of the pair's token ids).

Chat templates that insert today's date (Llama 3.x: ``date_string`` / ``strftime_now``) would make
token ids depend on the day: such a run fixes one date (``TokenizeSettings.chat_date``, chosen when
a fresh run starts, reused on --resume) and renders every prompt with it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from prefnoise import columns as C
from prefnoise.atomic import atomic_path
from prefnoise.data import file_fingerprint
from prefnoise.errors import PrefnoiseError

REF_CHOSEN = "ref_chosen_logp"
REF_REJECTED = "ref_rejected_logp"
CONTENT_KEY = "content_key"
FINGERPRINT_KEY = b"prefnoise.ref_fingerprint"
# Part of the reference-cache key: bump it whenever how token ids or log-probs are computed changes
# (tokenization, truncation, masking, the forward pass), so that older caches are recomputed.
LOGPROB_FORMAT_VERSION = 3
# The date_string style of Llama 3.x chat templates ("26 Jul 2024"): how a run's chat date is kept.
CHAT_DATE_FORMAT = "%d %b %Y"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


# --- log-probs ---------------------------------------------------------------------------------

def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels_mask: torch.Tensor,
) -> torch.Tensor:
    """Sum of log p(token | previous tokens) over positions where ``labels_mask`` is 1: shape [batch].

    Token t is scored by the logits at t-1, so the first token of a row is never scored; padding
    may sit on either side (positions come from ``attention_mask``). Where the model takes a boolean
    ``logits_to_keep`` (transformers 5), only the scored positions go through the vocabulary head:
    prompt and padding positions cost no logits (the head is most of a small model's compute).
    """
    scored = labels_mask[:, 1:].bool()
    if _keeps_logits_by_mask(model):
        keep = torch.nn.functional.pad(scored, (0, 1))  # position t predicts token t+1; the last predicts none
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            logits_to_keep=keep,
        ).logits
        if logits.ndim == 2 and logits.shape[0] == int(scored.sum()):  # [scored tokens, vocab]
            logits = logits.float()
            targets = input_ids[:, 1:][scored]
            token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
            rows = scored.nonzero()[:, 0]
            return torch.zeros(input_ids.shape[0], dtype=token_logps.dtype,
                               device=token_logps.device).index_add(0, rows, token_logps)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    # gather - logsumexp avoids materializing a second [batch, length, vocab] tensor
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * labels_mask[:, 1:].to(token_logps.dtype)).sum(-1)


def _keeps_logits_by_mask(model: torch.nn.Module) -> bool:
    """Whether ``model`` (unwrapped from DDP and peft) has a ``logits_to_keep`` argument that accepts a
    boolean mask: its modeling module slices with transformers' ``slice_logits_to_keep`` (a few older
    models slice by hand and would fail on a mask); the caller also checks the logits' shape."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft
    if not hasattr(sys.modules.get(type(inner).__module__), "slice_logits_to_keep"):
        return False
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


# --- tokenization --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizeSettings:
    """How pairs become token ids; part of the reference-cache fingerprint."""

    max_length: int = 512
    max_prompt_length: int = 256
    chat_template: bool = False  # prompt from PROMPT_MESSAGES through the tokenizer's template
    chat_date: str | None = None  # the run's fixed date for templates that render today's date


@dataclass
class TokenizedPairs:
    """Token ids of each pair: one prompt, two responses (EOS-terminated), plus counts."""

    pair_ids: list[str]
    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    truncated_rows: int
    settings: TokenizeSettings

    def __len__(self) -> int:
        return len(self.pair_ids)

    def token_count(self) -> int:
        """Tokens in all (prompt + chosen) and (prompt + rejected) sequences."""
        return sum(
            2 * len(p) + len(c) + len(r)
            for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids, strict=True)
        )

    def content_keys(self) -> list[str]:
        """Per pair, a hash of its token ids: a flipped pair keeps its pair_id but not this key."""
        keys = []
        for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids, strict=True):
            digest = hashlib.blake2b(digest_size=8)
            for ids in (p, c, r):
                digest.update(len(ids).to_bytes(4, "little") + b"".join(i.to_bytes(4, "little") for i in ids))
            keys.append(digest.hexdigest())
        return keys

    def subset(self, indices: Sequence[int]) -> TokenizedPairs:
        """The pairs at ``indices`` (truncation count kept from the whole set)."""
        return TokenizedPairs(
            [self.pair_ids[i] for i in indices], [self.prompt_ids[i] for i in indices],
            [self.chosen_ids[i] for i in indices], [self.rejected_ids[i] for i in indices],
            self.truncated_rows, self.settings,
        )


def uses_chat_template(frame: pl.DataFrame, tokenizer) -> bool:
    """True when the data is conversational (PROMPT_MESSAGES column) and the tokenizer has a template."""
    return C.PROMPT_MESSAGES in frame.columns and bool(getattr(tokenizer, "chat_template", None))


def template_uses_date(tokenizer) -> bool:
    """True when the tokenizer's chat template renders a date (``date_string`` or ``strftime_now``)."""
    template = getattr(tokenizer, "chat_template", None)
    texts = template.values() if isinstance(template, dict) else [template]
    return any(isinstance(t, str) and ("date_string" in t or "strftime_now" in t) for t in texts)


def today() -> str:
    """Today's date in ``CHAT_DATE_FORMAT``: the chat date of a fresh run."""
    return datetime.date.today().strftime(CHAT_DATE_FORMAT)


@contextlib.contextmanager
def fixed_template_clock(chat_date: str | None) -> Iterator[None]:
    """While active, the templates' ``strftime_now`` formats ``chat_date`` instead of the clock.

    transformers' ``strftime_now`` reads ``datetime.now()`` of its own module at render time (and
    callables cannot be passed as template variables), so that name is swapped for the duration.
    """
    from transformers.utils import chat_template_utils  # heavy: transformers

    real = getattr(chat_template_utils, "datetime", None)
    if chat_date is None or not isinstance(real, type):  # another transformers: date_string only
        yield
        return
    fixed = datetime.datetime.strptime(chat_date, CHAT_DATE_FORMAT)

    class FixedDatetime(real):
        @classmethod
        def now(cls, tz=None):
            return fixed.replace(tzinfo=tz)

    chat_template_utils.datetime = FixedDatetime
    try:
        yield
    finally:
        chat_template_utils.datetime = real


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int], list[int], bool]:
    """Apply the truncation policy; return the kept ids and whether anything was cut.

    The prompt keeps its last tokens: all of them if the longer response fits beside it, else at
    least ``max_prompt_length``. Then each response keeps its first ``max_length - len(prompt)``.
    """
    longest = max(len(chosen), len(rejected))
    cut = False
    if len(prompt) + longest > max_length:
        keep = min(len(prompt), max(max_length - longest, max_prompt_length))
        cut = keep < len(prompt)
        prompt = prompt[len(prompt) - keep:]
    room = max_length - len(prompt)
    if longest > room:
        cut = True
        chosen, rejected = chosen[:room], rejected[:room]
    return prompt, chosen, rejected, cut


def tokenize_pairs(
    frame: pl.DataFrame, tokenizer, settings: TokenizeSettings, *, source: str = "data"
) -> TokenizedPairs:
    """Token ids of every pair in ``frame`` (canonical columns, ``pair_id`` present).

    Prompts start with BOS when the tokenizer has one (kept through truncation). Plain-text
    responses end with EOS (one, as TRL's DPOTrainer adds it). With a chat template, each response
    is rendered as TRL does: the prompt messages plus one assistant message through the template,
    the response being the tokens after the common prefix with the templated prompt (so it ends
    with the template's end-of-turn, no EOS added). Raises PrefnoiseError naming the pair when a
    response is empty after truncation.
    """
    if settings.max_prompt_length >= settings.max_length:
        raise PrefnoiseError(
            f"--max-prompt-length ({settings.max_prompt_length}) must be smaller than "
            f"--max-length ({settings.max_length}) to leave room for the response"
        )
    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if settings.chat_template:
        prompt_ids, chosen_ids, rejected_ids = _chat_template_ids(frame, tokenizer, settings.chat_date, ids)
    else:
        prompt_ids, chosen_ids, rejected_ids = (ids(frame[c].to_list()) for c in (C.PROMPT, C.CHOSEN, C.REJECTED))
    out = TokenizedPairs([], [], [], [], 0, settings)
    rows = zip(frame[C.PAIR_ID].to_list(), prompt_ids, chosen_ids, rejected_ids, strict=True)
    # plain-text responses get one EOS (TRL adds it unless the text already ends with it)
    add_eos = eos is not None and not settings.chat_template
    for pair_id, prompt, chosen, rejected in rows:
        if add_eos:
            chosen, rejected = (r if r[-1:] == [eos] else [*r, eos] for r in (chosen, rejected))
        # BOS survives truncation: the budget is cut for the prompt body behind it.
        if bos is not None and prompt[:1] == [bos]:
            prompt = prompt[1:]
        head = [] if bos is None else [bos]
        prompt, chosen_kept, rejected_kept, cut = truncate_pair(
            prompt, chosen, rejected, settings.max_length - len(head),
            max(0, settings.max_prompt_length - len(head)),
        )
        prompt = head + prompt
        for side, kept, full in (("chosen", chosen_kept, chosen), ("rejected", rejected_kept, rejected)):
            text_tokens = len(full) - add_eos
            if min(len(kept), text_tokens) == 0:
                raise PrefnoiseError(
                    f"{source}: pair {pair_id}: {side} response is empty after truncation "
                    f"({text_tokens} tokens, max-length {settings.max_length}, prompt kept "
                    f"{len(prompt)}); remove the pair or raise --max-length"
                )
        if not prompt:
            raise PrefnoiseError(
                f"{source}: pair {pair_id}: prompt is empty and the tokenizer has no BOS token, "
                "so the first response token cannot be scored; give every pair a prompt"
            )
        out.pair_ids.append(pair_id)
        out.prompt_ids.append(prompt)
        out.chosen_ids.append(chosen_kept)
        out.rejected_ids.append(rejected_kept)
        out.truncated_rows += cut
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _chat_template_ids(
    frame: pl.DataFrame, tokenizer, chat_date: str | None, ids: Callable[[list[str]], list[list[int]]]
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Prompt, chosen and rejected ids of conversational rows, split as TRL's DPOTrainer does.

    The prompt messages are rendered with the generation prompt; prompt + one assistant message
    (the response) without it. The response is what follows the common prefix of the prompt
    and both renderings (templates may render a prompt alone differently).
    """
    # a date-rendering template sees the run's date, never the clock (see fixed_template_clock)
    dated = {} if chat_date is None else {"date_string": chat_date}
    prompts, chosen, rejected = [], [], []
    with fixed_template_clock(chat_date):
        for messages, c, r in zip(frame[C.PROMPT_MESSAGES].to_list(), frame[C.CHOSEN].to_list(),
                                  frame[C.REJECTED].to_list(), strict=True):
            messages = json.loads(messages)

            def render(tail: list[dict], generation: bool, messages=messages) -> str:
                return tokenizer.apply_chat_template(messages + tail, tokenize=False,
                                                     add_generation_prompt=generation, **dated)

            prompts.append(render([], True))
            chosen.append(render([{"role": "assistant", "content": c}], False))
            rejected.append(render([{"role": "assistant", "content": r}], False))
    out: tuple[list[list[int]], list[list[int]], list[list[int]]] = ([], [], [])
    for prompt, full_c, full_r in zip(ids(prompts), ids(chosen), ids(rejected), strict=True):
        cut = min(_common_prefix(prompt, full_c), _common_prefix(prompt, full_r))
        for part, seq in zip(out, (prompt[:cut], full_c[cut:], full_r[cut:]), strict=True):
            part.append(seq)
    return out


def collate(
    prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int, *, left_pad: bool = False
) -> dict[str, torch.Tensor]:
    """Padded ``input_ids``, ``attention_mask`` and ``labels_mask`` (1 on response tokens) for a batch."""
    rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        start = width - len(row) if left_pad else 0
        input_ids[i, start:start + len(row)] = torch.tensor(row)
        attention[i, start:start + len(row)] = 1
        labels[i, start + len(prompt):start + len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels_mask": labels}


def collate_pairs(pairs: TokenizedPairs, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2n rows, the n chosen sequences then the n rejected ones (one forward pass)."""
    prompts = [pairs.prompt_ids[i] for i in indices]
    responses = [pairs.chosen_ids[i] for i in indices] + [pairs.rejected_ids[i] for i in indices]
    return collate(prompts + prompts, responses, pad_id)


def pair_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs of a batch built by ``collate_pairs``."""
    logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels_mask"])
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad, else EOS, else 0 (masked out either way)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


# --- reference pass and cache --------------------------------------------------------------------

@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    pairs: TokenizedPairs,
    *,
    pad_id: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> pl.DataFrame:
    """One no-grad pass of ``model`` over ``pairs``: a frame of pair_id, ref_chosen_logp, ref_rejected_logp."""
    was_training = model.training
    model.eval()
    # longest first keeps padding low and hits an out-of-memory early rather than late
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs.prompt_ids[i]) - max(
        len(pairs.chosen_ids[i]), len(pairs.rejected_ids[i])))
    chosen = torch.empty(len(pairs), dtype=torch.float64)
    rejected = torch.empty(len(pairs), dtype=torch.float64)
    device_type = torch.device(device).type
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(pairs, indices, pad_id).items()}
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            c, r = pair_logps(model, batch)
        chosen[indices] = c.double().cpu()
        rejected[indices] = r.double().cpu()
        if on_progress:
            on_progress(len(indices))
    model.train(was_training)
    return pl.DataFrame({C.PAIR_ID: pairs.pair_ids, CONTENT_KEY: pairs.content_keys(),
                         REF_CHOSEN: chosen.numpy(), REF_REJECTED: rejected.numpy()})


def weight_file_stats(model_path: str | Path) -> dict[str, list[int | None]]:
    """Size and modification time (ns) of every weight file under ``model_path`` (links followed).

    ``file_fingerprint`` hashes only sampled blocks of a file over 256 MiB, so a weight file
    rewritten in place could keep its fingerprint; its mtime changes even then.
    """
    root = Path(model_path)
    files = sorted(p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES) if root.is_dir() else [root]
    stats: dict[str, list[int | None]] = {}
    for file in files:
        name = file.relative_to(root).as_posix() if root.is_dir() else file.name
        try:
            st = os.stat(file)
        except OSError:  # a dangling link: named, with no stats
            stats[name] = [None, None]
            continue
        stats[name] = [st.st_size, st.st_mtime_ns]
    return stats


def reference_fingerprint(model_path: str | Path, settings: TokenizeSettings, dtype: str) -> str:
    """Fingerprint that keys the reference cache: model files (content fingerprint, and size and
    mtime of each weight file), tokenization settings (chat date included), compute dtype and
    ``LOGPROB_FORMAT_VERSION``."""
    spec = json.dumps({"model": file_fingerprint(model_path), "weights": weight_file_stats(model_path),
                       "tokenize": asdict(settings), "dtype": dtype, "format": LOGPROB_FORMAT_VERSION},
                      sort_keys=True)
    return hashlib.blake2b(spec.encode(), digest_size=16).hexdigest()


def read_reference_cache(path: str | Path, fingerprint: str, pairs: TokenizedPairs) -> pl.DataFrame | None:
    """The cached reference log-probs of ``pairs`` (in order), or None if stale or incomplete.

    Rows match on pair_id and on the token content, so a pair whose labels were flipped since is a miss.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise PrefnoiseError(f"reference cache {path}: unreadable ({exc}); delete it to recompute") from exc
    if (table.schema.metadata or {}).get(FINGERPRINT_KEY, b"").decode() != fingerprint:
        return None
    cached = pl.from_arrow(table)
    if CONTENT_KEY not in cached.columns:
        return None
    wanted = pl.DataFrame({C.PAIR_ID: pairs.pair_ids, CONTENT_KEY: pairs.content_keys()})
    cached = cached.unique([C.PAIR_ID, CONTENT_KEY], keep="last")
    joined = wanted.join(cached, on=[C.PAIR_ID, CONTENT_KEY], how="left", maintain_order="left")
    if joined[REF_CHOSEN].null_count() or joined[REF_REJECTED].null_count():
        return None
    return joined.select(C.PAIR_ID, CONTENT_KEY, REF_CHOSEN, REF_REJECTED)


def write_reference_cache(frame: pl.DataFrame, path: str | Path, fingerprint: str) -> None:
    """Write the reference log-probs with ``fingerprint`` in the Parquet metadata (atomic rename)."""
    table = frame.to_arrow()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), FINGERPRINT_KEY: fingerprint})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
