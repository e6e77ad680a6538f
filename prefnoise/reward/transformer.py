"""The ``transformer`` backend: a local Hugging Face model scoring prompt+response tokens, trained by
fit-reward (a scalar head, optionally LoRA) or loaded as it is.

Reward models prefnoise did not train: ``score``, ``rank-check --model`` and the API accept, besides a
``fit-reward`` directory, any ``AutoModelForSequenceClassification`` checkpoint with one label
(``num_labels=1``), as TRL's RewardTrainer saves it: ``config.json``, weights and the tokenizer (with its
chat template) in one directory. Rows are tokenized by the project's own rules
(:func:`prefnoise.reward.tokens.encode_pairs`, or :func:`~prefnoise.reward.tokens.encode_chat_pairs`
through the tokenizer's chat template when the table is conversational), and the reward is the head's
score at the last attended token (:class:`~prefnoise.reward.networks.SequenceReward`), unclipped.

A hub id (``org/name``) resolves through the local Hugging Face cache exactly as ``from_pretrained``
finds it (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; the revision
``refs/main`` points at): prefnoise never downloads. An id that is not cached fails in one line:
"not found locally or in the Hugging Face cache; offline". Nothing from the directory is ever run
(:func:`prefnoise.hf.from_pretrained` pins ``trust_remote_code=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from prefnoise.errors import PrefnoiseError
from prefnoise.hf import from_pretrained, quiet_transformers
from prefnoise.hub import cached_snapshot, hub_cache_dir
from prefnoise.resources import activation_bytes, check_fits_in_memory, model_dims, training_memory_bytes
from prefnoise.reward.models import CONFIG_FILE, HEAD_FILE, HEADS, RewardModel, _write_config
from prefnoise.reward.networks import PooledReward, SequenceReward
from prefnoise.reward.tokens import (
    check_reward_model_dir,
    encode_chat_pairs,
    encode_pairs,
    load_tokenizer,
    pad_batch,
    uses_chat_template,
)
from prefnoise.training import resolve_precision


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

    def sequences(self, sides: Sequence[Any], index: np.ndarray) -> list[list[int]]:
        """The token ids of rows ``index`` of every prepared side, side after side (what :meth:`batch` pads)."""
        return [side[i] for side in sides for i in index]

    def batch(self, sides, index, device):
        rows = self.sequences(sides, index)
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
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification  # heavy
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES  # heavy

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
    path = check_reward_model_dir(model_path, "--model")
    tokenizer = load_tokenizer(path, "--model")
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


def check_training_fits(model: RewardModel, lengths: Sequence[int], batch_size: int, *, precision: str,
                        device: torch.device, early_stopping: bool) -> None:
    """Refuse, with the estimate, a transformer reward model whose training cannot fit where it trains.

    The estimate (:func:`prefnoise.resources.training_memory_bytes`) counts float32 weights, the gradient
    and Adam's moments of the trained parameters (LoRA: the adapters and the head only), an early-stopping
    snapshot, and the activations of the largest batch: both sides of ``batch_size`` pairs padded to the
    longest training pair of ``lengths``. Called after the weights are loaded and before the optimizer
    and the first batch allocate; the weights already held count as available.
    """
    parameters = sum(p.numel() for p in model.module.parameters())
    trainable = sum(p.numel() for p in model.module.parameters() if p.requires_grad)
    held = sum(p.numel() * p.element_size() for p in model.module.parameters())
    hidden, layers = model_dims(model.module.model.config)
    element = 2 if resolve_precision(precision, device.type == "cuda") == "bf16" else 4
    tokens = 2 * min(batch_size, len(lengths)) * max(lengths, default=0)
    needed = training_memory_bytes(parameters, trainable, activation_bytes(tokens, layers, hidden, element),
                                   weight_copies=int(early_stopping))
    check_fits_in_memory(
        needed, f"the reward model {model.config['base_model']} ({parameters:,} parameters, {trainable:,} trained, "
        f"batches of {tokens:,} tokens)", "lower --batch-size or --max-length, or train LoRA adapters (--lora-r)",
        device=device, held=held)


def add_lora(model: RewardModel, *, r: int, alpha: float, dropout: float) -> None:
    """Train ``model`` (transformer backend) through LoRA adapters of rank ``r`` on its backbone's linear
    layers; the reward head (``score``/``classifier``, or the pooled head) stays fully trainable."""
    from peft import LoraConfig, get_peft_model  # optional: LoRA runs only

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


WHAT = "reward model"
SEQUENCE_CLASSIFICATION = "ForSequenceClassification"
DEFAULT_MAX_LENGTH = 1024  # when neither the tokenizer nor the config states a usable limit
_NO_LIMIT = 10**6  # transformers' "no model_max_length" sentinel is ~1e30


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` is spelled like a hub model id (``name`` or ``org/name``), not like a path."""
    if not name or name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/"):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # heavy: only for a hub-like name

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model(name: str | Path, what: str = WHAT) -> Path:
    """A local model directory for ``name``: the directory itself, or a hub id's cached snapshot.

    PrefnoiseError (one line) when ``name`` is neither an existing path nor a hub id in the cache.
    """
    path = Path(name)
    if path.exists():
        return path
    text = str(name)
    if not looks_like_hub_id(text):
        raise PrefnoiseError(f"{what} {text}: does not exist; give a model directory or a hub id (org/name)")
    snapshot = cached_snapshot(text, "model")
    if snapshot is None:
        raise PrefnoiseError(
            f"{what} {text}: not found locally or in the Hugging Face cache ({hub_cache_dir()}); offline: prefnoise "
            f"never downloads, so fetch it first (hf download {text}) or pass a local directory"
        )
    return snapshot


def is_external(directory: str | Path) -> bool:
    """Whether ``directory`` names a model prefnoise did not write: a directory with ``config.json`` and no
    ``reward_config.json``, or a hub id that is not a local path."""
    path = Path(directory)
    if path.is_dir():
        return (path / "config.json").is_file() and not (path / CONFIG_FILE).exists()
    return not path.exists() and looks_like_hub_id(str(directory))


def _max_length(tokenizer: Any, config: Any) -> int:
    """The longest sequence to score: the tokenizer's model_max_length, within the model's positions."""
    limits = [getattr(tokenizer, "model_max_length", None)]
    limits += [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions")]
    usable = [int(v) for v in limits if isinstance(v, int) and 0 < v < _NO_LIMIT]
    return min(usable) if usable else DEFAULT_MAX_LENGTH


def load_external_reward_model(name: str | Path, *, what: str = WHAT) -> Any:
    """A :class:`~prefnoise.reward.models.TransformerRewardModel` for a sequence-classification checkpoint
    with ``num_labels=1`` (a local directory or cached hub id), on CPU in eval mode."""
    from transformers import AutoConfig, AutoModelForSequenceClassification  # heavy: loaded when a model is

    path = resolve_model(name, what)
    label = f"{what} {name}" if str(name) == str(path) else f"{what} {name} ({path})"
    hf_config = from_pretrained(AutoConfig, path, what=what)
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if architectures and not any(a.endswith(SEQUENCE_CLASSIFICATION) for a in architectures):
        raise PrefnoiseError(
            f"{label}: config.json's architecture {architectures[0]} has no reward head; expected a "
            f"*{SEQUENCE_CLASSIFICATION} checkpoint with num_labels=1 (as TRL's RewardTrainer saves it), "
            "or a directory written by `prefnoise fit-reward`"
        )
    if hf_config.num_labels != 1:
        raise PrefnoiseError(
            f"{label}: the classification head has {hf_config.num_labels} labels; a reward model has one "
            "(num_labels=1, as TRL's RewardTrainer saves it)"
        )
    tokenizer = load_tokenizer(path, what)
    model = from_pretrained(AutoModelForSequenceClassification, path, what=what, config=hf_config,
                            dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    config = {
        "backend": "transformer",
        "base_model": str(name),
        "head": "sequence-classification",
        "max_length": _max_length(tokenizer, hf_config),
        "output_clip": None,
        "external": True,
    }
    reward = TransformerRewardModel(SequenceReward(model, None), config, tokenizer)
    reward.module.eval()
    return reward
