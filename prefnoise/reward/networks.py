"""The reward networks: an MLP on feature vectors, and scalar heads on a Hugging Face model."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from prefnoise.resources import check_mlp_fits


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
