"""Reward-model backends: a scalar r(prompt, response) and the pipeline that feeds it.

Each backend turns (prompts, responses, features) into a "prepared" input once, then cuts batches
out of it; the chosen and rejected sides of a batch go through the network as one stacked batch.

- ``mlp``: an MLP on fixed-size feature vectors (the paper's synthetic setting); here, with the base
  class and what ``reward_config.json`` holds.
- ``transformer`` (:mod:`prefnoise.reward.transformer`): a local Hugging Face model with a scalar head
  (sequence classification with ``num_labels=1``, or the base model + a linear head on mean-pooled
  states), also a sequence-classification checkpoint prefnoise did not train.
- ``embed+mlp`` (:mod:`prefnoise.reward.embed`): a frozen local encoder embeds each (prompt, response)
  once (mean or CLS pooling, of the pair or the response alone, cached on disk); an MLP (or a linear
  head) is trained on the embeddings, optionally with length features.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from prefnoise.errors import PrefnoiseError
from prefnoise.hf import first_line, read_safetensors
from prefnoise.reward.networks import FeatureMLP

CONFIG_FILE = "reward_config.json"
WEIGHTS_FILE = "model.safetensors"  # mlp weights; HF models write their own model.safetensors
HEAD_FILE = "head.safetensors"  # the linear head of a pooled transformer
ENCODER_DIR = "encoder"  # embed+mlp: a copy of the frozen encoder, so the model dir stands alone
BACKENDS = ("mlp", "transformer", "embed+mlp")

class RewardModel:
    """A reward network plus its input pipeline; ``config`` is what reward_config.json stores."""

    backend = ""

    def __init__(self, module: nn.Module, config: dict[str, Any]) -> None:
        self.module = module
        self.config = config
        # where scoring's eval batches run: here (None) or on Ray actors (--engine ray; a
        # prefnoise.reward.remote.RemoteForward, for the transformer backend)
        self.remote: Any = None

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
        return torch.from_numpy(np.array(features, dtype=np.float32))  # a writable copy: nothing to embed

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
