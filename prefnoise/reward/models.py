"""Reward-model backends: a scalar r(prompt, response) and the pipeline that feeds it.

Each backend turns (prompts, responses, features) into a "prepared" input once, then cuts batches
out of it; the chosen and rejected sides of a batch go through the network as one stacked batch.

- ``mlp``: an MLP on fixed-size feature vectors (the paper's synthetic setting).
- ``transformer``: a local Hugging Face model with a scalar head (sequence classification with
  ``num_labels=1``, or the base model + a linear head on mean-pooled states).
- ``embed+mlp``: a frozen local encoder embeds each (prompt, response) once (mean or CLS pooling,
  of the pair or the response alone, cached on disk); an MLP (or a linear head) is trained on the
  embeddings, optionally with length features.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from prefnoise.errors import PrefnoiseError
from prefnoise.hf import check_model_dir, first_line, from_pretrained, quiet_transformers, read_safetensors
from prefnoise.resources import check_mlp_fits

CONFIG_FILE = "reward_config.json"
WEIGHTS_FILE = "model.safetensors"  # mlp weights; HF models write their own model.safetensors
HEAD_FILE = "head.safetensors"  # the linear head of a pooled transformer
ENCODER_DIR = "encoder"  # embed+mlp: a copy of the frozen encoder, so the model dir stands alone
BACKENDS = ("mlp", "transformer", "embed+mlp")


def clip_reward(reward: Tensor, output_clip: float | None) -> Tensor:
    """``reward`` clamped to [−output_clip, output_clip] (unchanged when ``output_clip`` is None).

    Every backend bounds its scalar output with this one function, so unbounded losses
    (unhinged, rdpo, exponential) cannot drive the rewards to infinity.
    """
    if output_clip is None:
        return reward
    return torch.clamp(reward, -output_clip, output_clip)


class FeatureMLP(nn.Module):
    """MLP on a feature vector -> scalar reward, clipped to [−output_clip, output_clip]."""

    def __init__(
        self, in_dim: int, hidden: int = 256, layers: int = 2, dropout: float = 0.0, output_clip: float | None = 20.0
    ) -> None:
        super().__init__()
        check_mlp_fits(in_dim, hidden, layers)  # before allocating: an absurd size fails in one line
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        blocks.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*blocks)
        self.output_clip = output_clip

    def forward(self, x: Tensor) -> Tensor:
        return clip_reward(self.net(x).squeeze(-1), self.output_clip)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Per row, the position of the last token with ``attention_mask`` 1 (right or left padding)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * (attention_mask != 0)).argmax(-1)


class SequenceReward(nn.Module):
    """A sequence-classification model with one label, read as a scalar reward (clipped by ``output_clip``).

    Decoder heads (a linear ``score`` applied at every position: GPT-2, Llama, Mistral, Qwen, ...)
    let transformers pick the "last token that is not pad_token_id", which is wrong when the pad
    token is the eos token (GPT-2) and a sequence ends in eos. Here the per-position scores are
    read off the ``score`` layer and pooled at the last position the attention mask marks, so a
    sequence gets the same reward alone or padded in a batch. Encoder heads (BERT's pooler on the
    first token) are padding-invariant already and are read as the model returns them.
    """

    def __init__(self, model: nn.Module, output_clip: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.output_clip = output_clip
        self._scores: Tensor | None = None
        score = getattr(model, "score", None)
        self.pools_last_token = isinstance(score, nn.Linear)
        if self.pools_last_token:
            score.register_forward_hook(self._keep_scores)

    def _keep_scores(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self._scores = output

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        self._scores = None
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        scores, self._scores = self._scores, None
        if self.pools_last_token and scores is not None and scores.dim() == 3:
            rows = torch.arange(scores.shape[0], device=scores.device)
            reward = scores[rows, last_token_index(attention_mask).to(scores.device), 0]
        else:
            reward = logits[:, 0]
        return clip_reward(reward, self.output_clip)


class PooledReward(nn.Module):
    """A base model + linear head on its mean-pooled last hidden states (clipped by ``output_clip``)."""

    def __init__(self, model: nn.Module, hidden_size: int, output_clip: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.head = nn.Linear(hidden_size, 1)
        self.output_clip = output_clip

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return clip_reward(self.head(mean_pool(states, attention_mask)).squeeze(-1), self.output_clip)


def mean_pool(states: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``states`` over the positions where ``attention_mask`` is 1."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _load_tokenizer(path: str | Path, what: str) -> Any:
    """The tokenizer saved in model dir ``path``, with a pad token (the eos token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, path, what=what)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PrefnoiseError(f"{what} {path}: tokenizer has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_model_dir(path: str | Path, what: str) -> Path:
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


def describe_truncation(stats: Sequence[dict[str, int]], max_length: int) -> str | None:
    """One line for the CLI about the rows ``encode_pairs`` had to cut (None when nothing was cut).

    ``stats``: the ``last_truncation`` of each ``prepare`` call (e.g. the chosen and rejected sides).
    """
    rows = sum(s["rows"] for s in stats)
    cut = sum(s["truncated"] for s in stats)
    if not cut:
        return None
    prompt = sum(s["prompt_truncated"] for s in stats)
    response = sum(s["response_truncated"] for s in stats)
    return (
        f"truncated {cut} of {rows} prompt+response sequences to --max-length {max_length} "
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


class RewardModel:
    """A reward network plus its input pipeline; ``config`` is what reward_config.json stores."""

    backend = ""

    def __init__(self, module: nn.Module, config: dict[str, Any]) -> None:
        self.module = module
        self.config = config

    def prepare(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        features: np.ndarray | None,
        *,
        device: torch.device,
        on_progress: Callable[[int], None] | None = None,
        prompt_messages: Sequence[str | None] | None = None,
    ) -> Any:
        """Per-row network inputs, computed once (features, token ids, or embeddings).

        ``prompt_messages`` (the JSON ``prompt_messages`` column of conversational tables) is read by
        the transformer backend only: with a chat-template tokenizer, rows go through the template.
        """
        raise NotImplementedError

    def batch(self, sides: Sequence[Any], index: np.ndarray, device: torch.device) -> dict[str, Tensor]:
        """Network inputs for rows ``index`` of each prepared side, stacked side after side."""
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Write weights, tokenizer (if any) and reward_config.json into ``directory``."""
        raise NotImplementedError


class MLPRewardModel(RewardModel):
    """The ``mlp`` backend: rewards from feature vectors."""

    backend = "mlp"

    def prepare(self, prompts, responses, features, *, device, on_progress=None):
        if features is None:
            raise PrefnoiseError("the mlp backend needs feature vectors (chosen_features/rejected_features)")
        dim = self.config["input_dim"]
        if features.ndim != 2 or features.shape[1] != dim:
            raise PrefnoiseError(f"feature vectors have shape {features.shape}; this model expects {dim} dims")
        if on_progress is not None:
            on_progress(len(features))
        return torch.from_numpy(np.array(features, dtype=np.float32))  # a writable copy

    def batch(self, sides, index, device):
        rows = torch.as_tensor(index, dtype=torch.long)
        return {"x": torch.cat([side[rows] for side in sides]).to(device, non_blocking=True)}

    def save(self, directory: Path) -> None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()},
            str(directory / WEIGHTS_FILE),
        )
        _write_config(directory, self.config)


def new_mlp(input_dim: int, *, hidden: int, layers: int, dropout: float, output_clip: float | None) -> MLPRewardModel:
    """A freshly initialised ``mlp`` reward model for ``input_dim``-dimensional features."""
    config = {
        "backend": "mlp",
        "input_dim": input_dim,
        "hidden": hidden,
        "layers": layers,
        "dropout": dropout,
        "output_clip": output_clip,
    }
    module = FeatureMLP(input_dim, hidden, layers, dropout, output_clip)
    return MLPRewardModel(module, config)


class TransformerRewardModel(RewardModel):
    """The ``transformer`` backend: a local HF model scoring prompt+response tokens."""

    backend = "transformer"

    def __init__(self, module: nn.Module, config: dict[str, Any], tokenizer: Any) -> None:
        super().__init__(module, config)
        self.tokenizer = tokenizer
        # counts of the latest prepare call (see encode_pairs); describe_truncation words them
        self.last_truncation: dict[str, int] | None = None

    def prepare(self, prompts, responses, features, *, device, on_progress=None, prompt_messages=None):
        if uses_chat_template(self.tokenizer, prompt_messages):
            ids, self.last_truncation = encode_chat_pairs(
                self.tokenizer, prompt_messages, responses, self.config["max_length"]
            )
        else:
            ids, self.last_truncation = encode_pairs(self.tokenizer, prompts, responses, self.config["max_length"])
        for row, seq in enumerate(ids):
            if not seq:
                raise PrefnoiseError(f"row {row}: prompt and response have no tokens to score")
        if on_progress is not None:
            on_progress(len(ids))
        return ids

    def batch(self, sides, index, device):
        rows = [side[i] for side in sides for i in index]
        return {k: v.to(device) for k, v in pad_batch(rows, self.tokenizer.pad_token_id).items()}

    def save(self, directory: Path) -> None:
        with quiet_transformers():
            self.module.model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))
        if isinstance(self.module, PooledReward):
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.module.head.state_dict().items()},
                str(directory / HEAD_FILE),
            )
        _write_config(directory, self.config)


def _hf_reward_module(
    path: Path, head: str | None, what: str, output_clip: float | None = None
) -> tuple[nn.Module, str]:
    """The scalar-reward module for HF model dir ``path`` and which head it uses."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    hf_config = from_pretrained(AutoConfig, path, what=what)
    if head is None:
        known = hf_config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
        head = "sequence-classification" if known else "pooled"
    if head == "sequence-classification":
        hf_config.num_labels = 1
        model = from_pretrained(
            AutoModelForSequenceClassification, path, what=what, config=hf_config, dtype=torch.float32
        )
        return SequenceReward(model, output_clip), head
    model = from_pretrained(AutoModel, path, what=what, config=hf_config, dtype=torch.float32)
    return PooledReward(model, model.config.hidden_size, output_clip), head


def new_transformer(
    model_path: str | Path, *, max_length: int, head: str | None = None, output_clip: float | None = None
) -> TransformerRewardModel:
    """A reward model on the local HF model at ``model_path`` with a fresh scalar head.

    ``head``: "sequence-classification", "pooled", or None (sequence classification when the
    architecture has one, else pooled). ``output_clip``: rewards are clamped to [−C, C] as the
    mlp backend's (None: unbounded).
    """
    if head is not None and head not in HEADS:
        raise PrefnoiseError(f"--head must be {' or '.join(HEADS)}, got {head!r}")
    path = _check_model_dir(model_path, "--model")
    tokenizer = _load_tokenizer(path, "--model")
    module, head = _hf_reward_module(path, head, "--model", output_clip)
    if isinstance(module, SequenceReward):
        module.model.config.pad_token_id = tokenizer.pad_token_id
    config = {
        "backend": "transformer",
        "base_model": str(path),
        "head": head,
        "max_length": max_length,
        "output_clip": output_clip,
    }
    return TransformerRewardModel(module, config, tokenizer)


def add_lora(model: RewardModel, *, r: int, alpha: float, dropout: float) -> None:
    """Train ``model`` (transformer backend) through LoRA adapters of rank ``r`` on its backbone's linear
    layers; the reward head (``score``/``classifier``, or the pooled head) stays fully trainable."""
    from peft import LoraConfig, get_peft_model

    module = model.module
    heads = ["score", "classifier"]  # a sequence-classification head: trained whole, never adapted
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                        exclude_modules=heads)
    module.model = get_peft_model(module.model, config)
    for name, param in module.model.named_parameters():
        if any(f".{head}." in f".{name}" for head in heads):
            param.requires_grad_(True)
    model.config = {**model.config, "lora": {"r": r, "alpha": alpha, "dropout": dropout, "merged": True}}


def merge_lora(model: RewardModel) -> None:
    """Fold ``model``'s LoRA adapters into its weights (what is saved is a plain transformers model)."""
    inner = model.module.model
    if hasattr(inner, "merge_and_unload"):
        model.module.model = inner.merge_and_unload()


EMBED_INPUTS = ("joint", "response")  # what the encoder reads: prompt and response as a text pair, or the response
POOLINGS = ("mean", "cls")  # mean of the token states (how all-MiniLM-L6-v2 was trained) or the first token's
LENGTH = "length"
DEFAULT_EMBED_FEATURES = ("joint-mean",)
FLUSH_EVERY = 2048  # cached vectors (all poolings) written to disk at least this often while embedding


def parse_embed_features(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """The ``embed+mlp`` feature parts named by ``spec`` ("joint-mean,response-mean,length" or a list).

    Each part is INPUT-POOLING (INPUT: joint = prompt and response as one text pair, response = the
    response alone; POOLING: mean or cls) or ``length`` (:func:`length_features`); the reward MLP
    reads their concatenation in the given order. None: joint-mean alone.
    """
    if spec is None:
        return DEFAULT_EMBED_FEATURES
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p).strip() for p in spec]
    known = [f"{i}-{p}" for i in EMBED_INPUTS for p in POOLINGS] + [LENGTH]
    if not parts or any(p not in known for p in parts) or len(set(parts)) != len(parts):
        raise PrefnoiseError(
            f"--embed-features {','.join(parts) if parts else spec!r}: give distinct parts, comma-separated, "
            f"from {', '.join(known)}"
        )
    return tuple(parts)


def length_features(responses: Sequence[str]) -> np.ndarray:
    """float32 (n, 2): ln(1 + characters) and ln(1 + whitespace-separated words) of each response.

    Response length predicts preference labels on real data (longer answers win more often); the
    logs keep the two numbers on the scale of the embedding entries.
    """
    return np.array(
        [[np.log1p(len(r)), np.log1p(len(r.split()))] for r in responses], dtype=np.float32
    ).reshape(len(responses), 2)


def pool_states(states: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """(n, hidden) pooled ``states``: ``mean`` over the attended positions or ``cls`` (position 0)."""
    if pooling == "mean":
        return mean_pool(states, attention_mask)
    if pooling == "cls":
        return states[:, 0]
    raise PrefnoiseError(f"unknown pooling {pooling!r}; use {' or '.join(POOLINGS)}")


class Encoder:
    """A frozen HF encoder that embeds (prompt, response) pairs or responses, with an on-disk cache.

    Each forward pass stores every pooling (mean and cls) in the cache, keyed by the text and by
    :meth:`part_fingerprint` (encoder files, max length, input and pooling), so an embedding is
    computed once across folds, losses, feature sets and runs.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_length: int,
        batch_size: int = 64,
        cache_dir: str | Path | None = None,
        what: str = "--encoder",
    ) -> None:
        from transformers import AutoModel

        self.path = _check_model_dir(path, what)
        self.tokenizer = _load_tokenizer(self.path, what)
        self.model = from_pretrained(AutoModel, self.path, what=what, dtype=torch.float32).eval()
        self.model.requires_grad_(False)
        self.max_length = max_length
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self._fingerprint: str | None = None
        self.forward_calls = 0  # encoder forward passes run by this object (the cache's tests count them)

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self.model.config.hidden_size)

    @property
    def fingerprint(self) -> str:
        """Content hash of the encoder's files plus the embedding settings (the joint-mean cache key)."""
        if self._fingerprint is None:
            from prefnoise.data import file_fingerprint

            # "untrunc": the tokenizer's own truncation/padding is off (see _untruncated); "keepend":
            # prompts are cut from the left (encode_pairs). Caches without them hold damaged vectors.
            self._fingerprint = file_fingerprint(self.path) + f"-len{self.max_length}-mean-keepend-untrunc"
        return self._fingerprint

    def part_fingerprint(self, inputs: str, pooling: str) -> str:
        """The cache key of one (input, pooling) part; joint-mean keeps :attr:`fingerprint` itself."""
        if (inputs, pooling) == ("joint", "mean"):
            return self.fingerprint
        return f"{self.fingerprint}|{inputs}-{pooling}"

    def missing(self, prompts: Sequence[str], responses: Sequence[str], inputs: str = "joint") -> int:
        """How many distinct texts :meth:`embed` would have to run the encoder on (cache misses)."""
        from prefnoise.reward.cache import EmbeddingCache

        prompts = _inputs_prompts(prompts, inputs)
        cache = EmbeddingCache.open(self.cache_dir, self.part_fingerprint(inputs, "mean"))
        return len({key for key in cache.keys_for(prompts, responses) if key not in cache})

    @torch.no_grad()
    def embed(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        device: torch.device,
        on_progress: Callable[[int], None] | None = None,
        pooling: str = "mean",
        inputs: str = "joint",
    ) -> np.ndarray:
        """float32 array (n, dim) of embeddings, reusing and extending the cache.

        ``inputs``: joint (prompt and response as a text pair) or response (the response alone);
        ``pooling``: mean or cls. ``on_progress(k)`` advances by the texts the encoder has just run
        on (cached texts are not counted; :meth:`missing` gives the total beforehand).
        """
        from prefnoise.reward.cache import EmbeddingCache

        if inputs not in EMBED_INPUTS:
            raise PrefnoiseError(f"unknown encoder input {inputs!r}; use {' or '.join(EMBED_INPUTS)}")
        pool_states(torch.zeros(1, 1, 1), torch.ones(1, 1), pooling)  # validates pooling
        prompts = _inputs_prompts(prompts, inputs)
        caches = {p: EmbeddingCache.open(self.cache_dir, self.part_fingerprint(inputs, p)) for p in POOLINGS}
        cache = caches[pooling]
        keys = cache.keys_for(prompts, responses)
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in cache:
                first.setdefault(key, i)
        missing = list(first.values())
        if missing:
            self.model.to(device)
            new: dict[str, dict[str, np.ndarray]] = {p: {} for p in POOLINGS}
            for start in range(0, len(missing), self.batch_size):
                rows = missing[start : start + self.batch_size]
                ids = tokenize_pairs(
                    self.tokenizer, [prompts[i] for i in rows], [responses[i] for i in rows], self.max_length
                )
                batch = {k: v.to(device) for k, v in pad_batch(ids, self.tokenizer.pad_token_id).items()}
                states = self.model(**batch).last_hidden_state.float()
                self.forward_calls += 1
                for name in POOLINGS:
                    pooled = pool_states(states, batch["attention_mask"], name).cpu().numpy()
                    for i, vector in zip(rows, pooled):
                        new[name][keys[i]] = vector
                if on_progress is not None:
                    on_progress(len(rows))
                if sum(len(v) for v in new.values()) >= FLUSH_EVERY:  # an interrupted run keeps its work
                    for name in POOLINGS:
                        caches[name].add(new[name])
                    new = {p: {} for p in POOLINGS}
            for name in POOLINGS:
                if new[name]:
                    caches[name].add(new[name])
        return cache.lookup(keys, self.dim)

    def save(self, directory: Path) -> None:
        """Copy the encoder and its tokenizer into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        with quiet_transformers():
            self.model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))


def _inputs_prompts(prompts: Sequence[str], inputs: str) -> list[str]:
    """The prompts the encoder reads for ``inputs``: as given (joint) or empty (response alone)."""
    return list(prompts) if inputs == "joint" else [""] * len(prompts)


def embed_feature_dim(parts: Sequence[str], encoder_dim: int) -> int:
    """Width of the concatenated ``parts`` (each encoder part ``encoder_dim``, length 2)."""
    return sum(2 if part == LENGTH else encoder_dim for part in parts)


class EmbedMLPRewardModel(MLPRewardModel):
    """The ``embed+mlp`` backend: an MLP (or, with 0 layers, a linear head) on frozen-encoder features."""

    backend = "embed+mlp"

    def __init__(self, module: nn.Module, config: dict[str, Any], encoder: Encoder) -> None:
        super().__init__(module, config)
        self.encoder = encoder

    @property
    def parts(self) -> tuple[str, ...]:
        """The feature parts the MLP reads (see :func:`parse_embed_features`)."""
        return parse_embed_features(self.config.get("embed_features"))

    def _encoder_parts(self) -> list[tuple[str, str]]:
        return [tuple(part.split("-")) for part in self.parts if part != LENGTH]  # type: ignore[misc]

    def to_embed(self, prompts: Sequence[str], responses: Sequence[str]) -> int:
        """How many encoder forward texts :meth:`prepare` of these rows will run (cache misses)."""
        inputs = dict.fromkeys(i for i, _ in self._encoder_parts())
        return sum(self.encoder.missing(prompts, responses, i) for i in inputs)

    def prepare(self, prompts, responses, features, *, device, on_progress=None):
        blocks = []
        for part in self.parts:
            if part == LENGTH:
                blocks.append(length_features(responses))
                continue
            inputs, pooling = part.split("-")
            blocks.append(
                self.encoder.embed(
                    prompts, responses, device=device, on_progress=on_progress, pooling=pooling, inputs=inputs
                )
            )
        return torch.as_tensor(np.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0])

    def save(self, directory: Path) -> None:
        self.encoder.save(directory / ENCODER_DIR)
        super().save(directory)


def new_embed_mlp(
    encoder_path: str | Path,
    *,
    max_length: int,
    hidden: int,
    layers: int,
    dropout: float,
    output_clip: float | None,
    cache_dir: str | Path | None = None,
    embed_batch_size: int = 64,
    embed_features: str | Sequence[str] | None = None,
) -> EmbedMLPRewardModel:
    """An ``embed+mlp`` reward model on the frozen local encoder at ``encoder_path``.

    ``embed_features``: the parts the MLP reads (:func:`parse_embed_features`; default joint-mean);
    ``layers`` 0 makes the head linear (a Bradley–Terry logistic regression on the features under
    the sigmoid loss).
    """
    parts = parse_embed_features(embed_features)
    encoder = Encoder(encoder_path, max_length=max_length, batch_size=embed_batch_size, cache_dir=cache_dir)
    mlp = new_mlp(
        embed_feature_dim(parts, encoder.dim), hidden=hidden, layers=layers, dropout=dropout, output_clip=output_clip
    )
    config = {
        **mlp.config,
        "backend": "embed+mlp",
        "encoder": str(encoder.path),
        "encoder_fingerprint": encoder.fingerprint,
        "max_length": max_length,
        "embed_features": list(parts),
    }
    return EmbedMLPRewardModel(mlp.module, config, encoder)


def _write_config(directory: Path, config: dict[str, Any]) -> None:
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")


HEADS = ("sequence-classification", "pooled")
SAVED_AS = "reward model"  # how messages name a directory written by fit-reward


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _valid_embed_features(value: Any) -> bool:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return False
    try:
        parse_embed_features(value)
    except PrefnoiseError:
        return False
    return True


# reward_config.json: per backend, each required key and a check of its value (with what it should be)
_CONFIG_KEYS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "mlp": {
        "input_dim": (lambda v: _is_int(v, 1), "an integer >= 1"),
        "hidden": (lambda v: _is_int(v, 1), "an integer >= 1"),
        "layers": (lambda v: _is_int(v, 0), "an integer >= 0"),
        "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "output_clip": (lambda v: v is None or (_is_number(v) and v > 0), "a number > 0 or null"),
    },
    "transformer": {
        "head": (lambda v: v in HEADS, " or ".join(HEADS)),
        "max_length": (lambda v: _is_int(v, 1), "an integer >= 1"),
    },
}
# keys older reward_config.json files may lack: checked when present, else read as the default
_OPTIONAL_KEYS: dict[str, dict[str, tuple[Callable[[Any], bool], str, Any]]] = {
    "transformer": {
        "output_clip": (lambda v: v is None or (_is_number(v) and v > 0), "a number > 0 or null", None),
    },
    "embed+mlp": {
        "embed_features": (_valid_embed_features, "a list of distinct feature parts", list(DEFAULT_EMBED_FEATURES)),
    },
}
_CONFIG_KEYS["embed+mlp"] = {
    **_CONFIG_KEYS["mlp"],
    "max_length": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "encoder_fingerprint": (lambda v: isinstance(v, str), "a string"),
}


def read_reward_config(directory: Path) -> dict[str, Any]:
    """The checked reward_config.json of reward model ``directory``; PrefnoiseError when it is unusable."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise PrefnoiseError(
            f"{directory}: not a prefnoise reward model (no {CONFIG_FILE}); train one with `prefnoise fit-reward`"
        )
    retrain = "train the model again with `prefnoise fit-reward`"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PrefnoiseError(f"{config_path}: not readable JSON ({first_line(error)}); {retrain}") from None
    if not isinstance(config, dict):
        raise PrefnoiseError(f"{config_path}: not a JSON object; {retrain}")
    backend = config.get("backend")
    if backend not in _CONFIG_KEYS:
        raise PrefnoiseError(f"{config_path}: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    for key, (valid, expected) in _CONFIG_KEYS[backend].items():
        if key not in config:
            raise PrefnoiseError(f"{config_path}: the {backend} backend needs {key!r}, which is missing; {retrain}")
        if not valid(config[key]):
            raise PrefnoiseError(f"{config_path}: {key} is {config[key]!r}, not {expected}; {retrain}")
    for key, (valid, expected, default) in _OPTIONAL_KEYS.get(backend, {}).items():
        if key not in config:
            config[key] = default
        elif not valid(config[key]):
            raise PrefnoiseError(f"{config_path}: {key} is {config[key]!r}, not {expected}; {retrain}")
    return config


def _load_weights(module: nn.Module, file: Path, directory: Path) -> None:
    """Load safetensors ``file`` into ``module``; PrefnoiseError when missing, damaged or mis-shaped."""
    if not file.is_file():
        raise PrefnoiseError(
            f"{SAVED_AS} {directory}: {file.name} is missing; train the model again with `prefnoise fit-reward`"
        )
    state = read_safetensors(file, SAVED_AS)
    expected = module.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            problem = f"{file.name} has no tensor {key!r}"
        elif tuple(state[key].shape) != tuple(tensor.shape):
            problem = (
                f"{file.name} has {key} of shape {list(state[key].shape)}, "
                f"{CONFIG_FILE} implies {list(tensor.shape)}"
            )
        else:
            continue
        raise PrefnoiseError(f"{SAVED_AS} {directory}: {problem}; train the model again with `prefnoise fit-reward`")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise PrefnoiseError(
            f"{SAVED_AS} {directory}: {file.name} has tensor {extra[0]!r} that {CONFIG_FILE} does not describe; "
            "train the model again with `prefnoise fit-reward`"
        )
    module.load_state_dict(state)


def load_reward_model(directory: str | Path, *, cache_dir: str | Path | None = None) -> RewardModel:
    """The reward model saved by ``fit-reward`` in ``directory`` (on CPU, eval mode).

    A missing, incomplete or damaged directory (reward_config.json, weights, encoder copy, tokenizer)
    raises a one-line PrefnoiseError naming it; no code from the directory is ever run. A plain
    sequence-classification checkpoint (num_labels=1, e.g. TRL's) or a cached hub id loads through
    :mod:`prefnoise.reward.external`.
    """
    from prefnoise.reward.external import is_external, load_external_reward_model

    if is_external(directory):
        return load_external_reward_model(directory)
    directory = Path(directory)
    config = read_reward_config(directory)
    backend = config["backend"]
    if backend in ("mlp", "embed+mlp"):
        try:
            module = FeatureMLP(
                config["input_dim"], config["hidden"], config["layers"], config["dropout"], config["output_clip"]
            )
        except (ValueError, RuntimeError, TypeError) as error:
            raise PrefnoiseError(f"{directory / CONFIG_FILE}: unusable MLP settings ({first_line(error)})") from None
        _load_weights(module, directory / WEIGHTS_FILE, directory)
        if backend == "mlp":
            model: RewardModel = MLPRewardModel(module, config)
        else:
            encoder = Encoder(
                directory / ENCODER_DIR,
                max_length=config["max_length"],
                cache_dir=cache_dir,
                what=f"{SAVED_AS} encoder",
            )
            width = embed_feature_dim(config["embed_features"], encoder.dim)
            if width != config["input_dim"]:
                raise PrefnoiseError(
                    f"{SAVED_AS} {directory}: the encoder copy and embed_features {','.join(config['embed_features'])} "
                    f"make {width} dims but {CONFIG_FILE} says input_dim {config['input_dim']}; "
                    "train the model again with `prefnoise fit-reward`"
                )
            # the copy has the original's weights, so it shares the original's cache entries
            encoder._fingerprint = config["encoder_fingerprint"]
            model = EmbedMLPRewardModel(module, config, encoder)
    else:  # "transformer" (read_reward_config accepts no other backend)
        tokenizer = _load_tokenizer(directory, SAVED_AS)
        module, _ = _hf_reward_module(directory, config["head"], SAVED_AS, config["output_clip"])
        if isinstance(module, SequenceReward) and module.model.config.pad_token_id is None:
            module.model.config.pad_token_id = tokenizer.pad_token_id
        if isinstance(module, PooledReward):
            _load_weights(module.head, directory / HEAD_FILE, directory)
        model = TransformerRewardModel(module, config, tokenizer)
    model.module.eval()
    return model
