"""Reward models prefnoise did not train: a plain sequence-classification directory or a cached hub id.

``score``, ``rank-check --model`` and the API accept, besides a ``fit-reward`` directory, any
``AutoModelForSequenceClassification`` checkpoint with one label (``num_labels=1``), as TRL's
RewardTrainer saves it: ``config.json``, weights and the tokenizer (with its chat template) in one
directory. Rows are tokenized by the project's own rules (:func:`prefnoise.reward.models.encode_pairs`,
or :func:`~prefnoise.reward.models.encode_chat_pairs` through the tokenizer's chat template when the
table is conversational), and the reward is the head's score at the last attended token
(:class:`~prefnoise.reward.models.SequenceReward`), unclipped.

A hub id (``org/name``) resolves through the local Hugging Face cache exactly as ``from_pretrained``
finds it (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; the revision
``refs/main`` points at): prefnoise never downloads. An id that is not cached fails in one line:
"not found locally or in the Hugging Face cache; offline". Nothing from the directory is ever run
(:func:`prefnoise.hf.from_pretrained` pins ``trust_remote_code=False``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefnoise.errors import PrefnoiseError

WHAT = "reward model"
SEQUENCE_CLASSIFICATION = "ForSequenceClassification"
DEFAULT_MAX_LENGTH = 1024  # when neither the tokenizer nor the config states a usable limit
_NO_LIMIT = 10**6  # transformers' "no model_max_length" sentinel is ~1e30


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` is spelled like a hub model id (``name`` or ``org/name``), not like a path."""
    if not name or name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/"):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

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
    from prefnoise.hub import cached_snapshot, hub_cache_dir

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
    from prefnoise.reward.models import CONFIG_FILE

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
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from prefnoise.hf import from_pretrained
    from prefnoise.reward.models import SequenceReward, TransformerRewardModel, _load_tokenizer

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
    tokenizer = _load_tokenizer(path, what)
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
