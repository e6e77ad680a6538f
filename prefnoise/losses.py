"""Margin losses and the DPO-family policy losses built on them.

A margin loss ℓ(z) scores one preference pair from its margin z = r(chosen) − r(rejected), where the
label says "chosen is better". Every function here is elementwise (no reduction) and pure; callers
average. Symmetric losses satisfy ℓ(z) + ℓ(−z) = K, which is what makes them robust to flipped
labels (Nishimori et al., arXiv 2505.24709).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prefnoise.errors import PrefnoiseError
from prefnoise.loss_names import MARGIN_RATE_PARAMS, POLICY_LOSS_NAMES, missing_rate

# exp(50) ≈ 5e21 is finite in float32 and bfloat16 (max ≈ 3.4e38), with room for a batch sum.
EXP_CLAMP = 50.0


def _check_eps(eps: float | None) -> float:
    if eps is None:
        raise PrefnoiseError("eps (a flip rate / label smoothing in [0, 0.5)) is required; there is no default")
    if not 0.0 <= eps < 0.5:
        raise PrefnoiseError(f"eps must be in [0, 0.5) (a flip rate / label smoothing), got {eps}")
    return float(eps)


def _check_positive(name: str, value: float) -> float:
    if not value > 0:
        raise PrefnoiseError(f"{name} must be > 0, got {value}")
    return float(value)


# --- symmetric: ℓ(z) + ℓ(−z) = K ---------------------------------------------------------------

def sigmoid_loss(z: Tensor) -> Tensor:
    """σ(−z); symmetric with K = 1."""
    return torch.sigmoid(-z)


def ramp_loss(z: Tensor) -> Tensor:
    """clip((1 − z)/2, 0, 1), the symmetric ramp; K = 1."""
    return torch.clamp(0.5 - 0.5 * z, 0.0, 1.0)


def unhinged_loss(z: Tensor) -> Tensor:
    """1 − z; symmetric with K = 2 (unbounded below)."""
    return 1.0 - z


# --- convex baselines ---------------------------------------------------------------------------

def logistic_loss(z: Tensor) -> Tensor:
    """log(1 + e^(−z)) = softplus(−z): the Bradley–Terry / DPO loss."""
    return F.softplus(-z)


def hinge_loss(z: Tensor) -> Tensor:
    """max(0, 1 − z)."""
    return F.relu(1.0 - z)


def squared_loss(z: Tensor) -> Tensor:
    """(1 − z)²."""
    return (1.0 - z) ** 2


def exponential_loss(z: Tensor) -> Tensor:
    """e^(−z), exponent clamped at EXP_CLAMP so values and gradients stay finite."""
    return torch.exp(torch.clamp(-z, max=EXP_CLAMP))


# --- noise-aware baselines ----------------------------------------------------------------------

def cdpo_loss(z: Tensor, eps: float) -> Tensor:
    """Label-smoothed logistic: (1−ε)·logistic(z) + ε·logistic(−z); ε has no default."""
    eps = _check_eps(eps)
    return (1.0 - eps) * F.softplus(-z) + eps * F.softplus(z)


def rdpo_loss(z: Tensor, eps: float) -> Tensor:
    """Unbiased logistic for a known flip rate ε: ((1−ε)·logistic(z) − ε·logistic(−z)) / (1−2ε); no default ε."""
    eps = _check_eps(eps)
    return ((1.0 - eps) * F.softplus(-z) - eps * F.softplus(z)) / (1.0 - 2.0 * eps)


def ipo_loss(z: Tensor, tau: float = 0.5) -> Tensor:
    """(z − 1/(2τ))²: squared distance of the margin to 1/(2τ) (τ = 0.5 targets margin 1).

    On a reward margin (fit-reward) there are no tokens, so this is IPO's form only, not TRL's IPO;
    the policy loss ``ipo`` (:func:`preference_loss`) feeds it TRL's per-token averaged log-ratios.
    """
    tau = _check_positive("tau", tau)
    return (z - 1.0 / (2.0 * tau)) ** 2


def ropo_loss(z: Tensor, alpha: float = 14.0) -> Tensor:
    """ROPO as the SymPO code runs it: 4α/(α+1)²·logistic(z) + 4α²/(α+1)²·σ(−z)."""
    alpha = _check_positive("alpha", alpha)
    scale = 4.0 * alpha / (alpha + 1.0) ** 2
    return scale * F.softplus(-z) + scale * alpha * torch.sigmoid(-z)


@dataclass(frozen=True)
class MarginLoss:
    """One entry of the margin-loss table."""

    name: str
    fn: Callable[..., Tensor]  # fn(z, **params) -> elementwise loss
    symmetric: bool
    constant: float | None  # K in ℓ(z) + ℓ(−z) = K when symmetric
    params: tuple[str, ...]  # keyword parameters fn accepts
    description: str


MARGIN_LOSSES: dict[str, MarginLoss] = {
    loss.name: loss
    for loss in (
        MarginLoss("sigmoid", sigmoid_loss, True, 1.0, (), "σ(−z); symmetric (SymPO default)"),
        MarginLoss("ramp", ramp_loss, True, 1.0, (), "clip((1−z)/2, 0, 1); symmetric ramp"),
        MarginLoss("unhinged", unhinged_loss, True, 2.0, (), "1 − z; symmetric, unbounded"),
        MarginLoss("logistic", logistic_loss, False, None, (), "log(1+e^(−z)); Bradley–Terry, DPO"),
        MarginLoss("hinge", hinge_loss, False, None, (), "max(0, 1 − z)"),
        MarginLoss("squared", squared_loss, False, None, (), "(1 − z)²"),
        MarginLoss("exponential", exponential_loss, False, None, (), "e^(−z), exponent clamped"),
        MarginLoss("cdpo", cdpo_loss, False, None, ("eps",), "label-smoothed logistic (eps required)"),
        MarginLoss("rdpo", rdpo_loss, False, None, ("eps",), "unbiased logistic for flip rate eps (required)"),
        MarginLoss("ipo", ipo_loss, False, None, ("tau",), "(z − 1/(2τ))² on the margin (no per-token averaging)"),
        MarginLoss("ropo", ropo_loss, False, None, ("alpha",), "ROPO: logistic + α·sigmoid mix"),
    )
}

SYMMETRIC_LOSSES: tuple[str, ...] = tuple(n for n, e in MARGIN_LOSSES.items() if e.symmetric)


def get_margin_loss(name: str) -> MarginLoss:
    """The table entry for ``name``; PrefnoiseError listing valid names otherwise."""
    try:
        return MARGIN_LOSSES[name]
    except KeyError:
        raise PrefnoiseError(
            f"unknown loss {name!r}; valid losses are {', '.join(MARGIN_LOSSES)}"
        ) from None


def margin_loss(name: str, z: Tensor, **params: float) -> Tensor:
    """Elementwise loss ``name`` at margins ``z`` (params such as eps/tau/alpha by keyword)."""
    entry = get_margin_loss(name)
    unknown = sorted(set(params) - set(entry.params))
    if unknown:
        accepted = ", ".join(entry.params) or "none"
        raise PrefnoiseError(
            f"loss {name!r} does not take {', '.join(unknown)}; it accepts: {accepted}"
        )
    missing = missing_rate(name, params, MARGIN_RATE_PARAMS)
    if missing:
        raise PrefnoiseError(missing)
    return entry.fn(z, **params)


def drdpo_loss(row_losses: Tensor, beta_prime: float = 1.0) -> Tensor:
    """Dr. DPO (Wu et al. 2024): −β′·log mean_batch exp(−ℓ/β′), ℓ the per-row DPO losses; a scalar.

    Batch-level: it has no per-row value. As β′ → ∞ it tends to mean(ℓ) (DPO), small β′ to min(ℓ).
    """
    beta_prime = _check_positive("beta_prime", beta_prime)
    n = row_losses.shape[0]
    return -beta_prime * (torch.logsumexp(-row_losses / beta_prime, dim=0) - math.log(n))


# --- policy level (DPO family) ------------------------------------------------------------------

POLICY_LOSSES: tuple[str, ...] = POLICY_LOSS_NAMES


def implicit_rewards(
    policy_logps: Tensor, ref_logps: Tensor, beta: float, clip: float | None = None
) -> Tensor:
    """β·(log π − log π_ref), clamped to [−clip, clip] when clip is given (SymPO's bound)."""
    rewards = beta * (policy_logps - ref_logps)
    if clip is not None:
        rewards = torch.clamp(rewards, -clip, clip)
    return rewards


def preference_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    symmetric_loss: str = "sigmoid",
    clip: float | None = 10.0,
    label_smoothing: float | None = None,
    noise_rate: float | None = None,
    tau: float | None = None,
    alpha: float = 14.0,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(elementwise losses, chosen rewards, rejected rewards) for policy loss ``name``.

    Rewards are the detached implicit rewards (summed log-probs); ``clip`` applies to sympo only.
    cdpo needs ``label_smoothing`` and rdpo ``noise_rate`` (no default ε). ipo needs the response
    token counts ``chosen_tokens``/``rejected_tokens``: as TRL's ``loss_type="ipo"`` it averages each
    response's log-ratio over its tokens. drdpo returns the per-row DPO losses ℓ; its objective is
    batch-level (:func:`drdpo_loss`, applied by :func:`policy_objective`).
    """
    if name not in POLICY_LOSSES:
        raise PrefnoiseError(f"unknown policy loss {name!r}; valid: {', '.join(POLICY_LOSSES)}")
    if not beta > 0:
        raise PrefnoiseError(f"beta must be > 0, got {beta}")
    if clip is not None and not clip > 0:
        raise PrefnoiseError(f"clip must be > 0 (or None to disable), got {clip}")
    reward_clip = clip if name == "sympo" else None
    chosen = implicit_rewards(policy_chosen_logps, ref_chosen_logps, beta, reward_clip)
    rejected = implicit_rewards(policy_rejected_logps, ref_rejected_logps, beta, reward_clip)
    z = chosen - rejected
    if name == "sympo":
        entry = get_margin_loss(symmetric_loss)
        if not entry.symmetric:
            valid = ", ".join(SYMMETRIC_LOSSES)
            raise PrefnoiseError(f"sympo needs a symmetric loss ({valid}), got {symmetric_loss!r}")
        losses = entry.fn(z)
    elif name in ("dpo", "drdpo"):
        losses = logistic_loss(z)
    elif name == "cdpo":
        if label_smoothing is None:
            raise PrefnoiseError("cdpo needs label_smoothing ε in [0, 0.5); there is no default")
        losses = cdpo_loss(z, eps=label_smoothing)
    elif name == "rdpo":
        if noise_rate is None:
            raise PrefnoiseError("rdpo needs noise_rate ε (the flip rate) in [0, 0.5); there is no default")
        losses = rdpo_loss(z, eps=noise_rate)
    elif name == "ipo":
        # TRL (loss_type="ipo") and the IPO paper: per-token averaged log-ratios, h = h_c/n_c − h_r/n_r
        # (n: response tokens, at least 1), target 1/(2τ), τ = β by default.
        if chosen_tokens is None or rejected_tokens is None:
            raise PrefnoiseError("ipo needs the response token counts (chosen_tokens, rejected_tokens)")
        h = ((policy_chosen_logps - ref_chosen_logps) / chosen_tokens.clamp(min=1)
             - (policy_rejected_logps - ref_rejected_logps) / rejected_tokens.clamp(min=1))
        losses = ipo_loss(h, tau=beta if tau is None else tau)
    elif name == "ropo":
        losses = ropo_loss(z, alpha=alpha)
    else:  # hinge: TRL's relu(1 − β·h) = hinge(z)
        losses = hinge_loss(z)
    return losses, chosen.detach(), rejected.detach()


def policy_objective(name: str, losses: Tensor, *, beta_prime: float = 1.0) -> Tensor:
    """The scalar a batch trains on: mean of the per-row losses, or Dr. DPO's batch-level objective."""
    return drdpo_loss(losses, beta_prime) if name == "drdpo" else losses.mean()
