"""Non-finite numbers in a run: how messages name them, and the first broken weight of a model."""

from __future__ import annotations

import math

import torch


def nonfinite_name(value: float) -> str:
    """nan, inf or -inf: how a message writes a non-finite number."""
    return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"


def first_nonfinite_parameter(module: torch.nn.Module) -> str | None:
    """The name of the first trainable parameter holding a NaN or ±inf (one device sync), or None."""
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if not named:
        return None
    # under FSDP a parameter is a DTensor: this process checks its own shard
    local = [p.to_local() if hasattr(p, "to_local") else p for _, p in named]
    sums = torch.stack([p.detach().sum(dtype=torch.float64) for p in local]).cpu()
    if bool(torch.isfinite(sums).all()):  # a NaN or ±inf entry makes its sum non-finite: none here
        return None
    finite = torch.stack([torch.isfinite(p.detach()).all() for p in local]).cpu()
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0, 0])][0]
