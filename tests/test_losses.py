"""Margin losses and policy losses against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefnoise.errors import PrefnoiseError
from prefnoise.losses import (
    MARGIN_LOSSES,
    POLICY_LOSSES,
    SYMMETRIC_LOSSES,
    implicit_rewards,
    margin_loss,
    preference_loss,
)

Z = [-3.0, -0.5, 0.0, 0.5, 3.0]

# (name, params, ℓ at each z in Z), computed by hand / with Python's math module.
EXPECTED = [
    ("sigmoid", {}, [0.9525741268, 0.6224593312, 0.5, 0.3775406688, 0.0474258732]),
    ("ramp", {}, [1.0, 0.75, 0.5, 0.25, 0.0]),
    ("unhinged", {}, [4.0, 1.5, 1.0, 0.5, -2.0]),
    ("logistic", {}, [3.0485873516, 0.9740769842, 0.6931471806, 0.4740769842, 0.0485873516]),
    ("hinge", {}, [4.0, 1.5, 1.0, 0.5, 0.0]),
    ("squared", {}, [16.0, 2.25, 1.0, 0.25, 4.0]),
    ("exponential", {}, [20.0855369232, 1.6487212707, 1.0, 0.6065306597, 0.0497870684]),
    # 0.8·logistic(z) + 0.2·logistic(−z)
    ("cdpo", {"eps": 0.2}, [2.4485873516, 0.8740769842, 0.6931471806, 0.5740769842, 0.6485873516]),
    # (0.8·logistic(z) − 0.2·logistic(−z)) / 0.6
    ("rdpo", {"eps": 0.2}, [4.0485873516, 1.1407436508, 0.6931471806, 0.3074103175, -0.9514126484]),
    # (z − 1/(2·0.25))² = (z − 2)²
    ("ipo", {"tau": 0.25}, [25.0, 6.25, 4.0, 2.25, 1.0]),
    # 56/225·logistic(z) + 784/225·σ(−z)
    ("ropo", {"alpha": 14.0},
     [4.0779511427, 2.4113618968, 1.9147388538, 1.4335119798, 0.1773456723]),
]


def test_every_loss_has_hand_values():
    assert {name for name, _, _ in EXPECTED} == set(MARGIN_LOSSES)


@pytest.mark.parametrize("name,params,expected", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_margin_loss_hand_values(name, params, expected):
    z = torch.tensor(Z, dtype=torch.float64)
    got = margin_loss(name, z, **params)
    assert got.shape == z.shape  # elementwise, no reduction
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-9, rtol=0)


def test_symmetric_set_and_constants():
    assert SYMMETRIC_LOSSES == ("sigmoid", "ramp", "unhinged")
    assert [MARGIN_LOSSES[n].constant for n in SYMMETRIC_LOSSES] == [1.0, 1.0, 2.0]
    others = [n for n in MARGIN_LOSSES if n not in SYMMETRIC_LOSSES]
    assert all(MARGIN_LOSSES[n].constant is None for n in others)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=32))
def test_symmetric_identity(values):
    z = torch.tensor(values, dtype=torch.float64)
    for name in SYMMETRIC_LOSSES:
        total = margin_loss(name, z) + margin_loss(name, -z)
        torch.testing.assert_close(total, torch.full_like(z, MARGIN_LOSSES[name].constant))


def test_non_symmetric_losses_violate_the_identity():
    z = torch.linspace(-4, 4, 81, dtype=torch.float64)
    for name, entry in MARGIN_LOSSES.items():
        if entry.symmetric:
            continue
        params = {"eps": 0.1} if "eps" in entry.params else {}  # cdpo/rdpo: ε has no default
        total = entry.fn(z, **params) + entry.fn(-z, **params)
        assert (total.max() - total.min()).item() > 0.1, name


def test_paper_code_ramp_trap_is_not_ours():
    # The paper's code's clip(1 − z, 0, 1) sums to 1.5 at z = 0.5; ours sums to 1.
    z = torch.tensor([0.5])
    assert (margin_loss("ramp", z) + margin_loss("ramp", -z)).item() == 1.0


def test_cdpo_rdpo_reduce_to_logistic_at_zero_eps():
    z = torch.linspace(-10, 10, 41, dtype=torch.float64)
    logistic = margin_loss("logistic", z)
    torch.testing.assert_close(margin_loss("cdpo", z, eps=0.0), logistic)
    torch.testing.assert_close(margin_loss("rdpo", z, eps=0.0), logistic)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(MARGIN_LOSSES))
def test_finite_values_and_gradients_at_extreme_margins(name, dtype):
    z = torch.tensor([-1e4, -1e3, -30.0, -1.0, 0.0, 1.0, 30.0, 1e3, 1e4], dtype=dtype,
                     requires_grad=True)
    loss = margin_loss(name, z, **({"eps": 0.2} if name in ("cdpo", "rdpo") else {}))  # ε has no default
    assert torch.isfinite(loss).all(), name
    loss.sum().backward()
    assert torch.isfinite(z.grad).all(), name


def test_logistic_is_stable_where_naive_form_overflows():
    z = torch.tensor([-1e4], dtype=torch.float32)
    assert margin_loss("logistic", z).item() == pytest.approx(1e4)
    assert torch.isinf(torch.log(1 + torch.exp(-z))).item()


def test_bad_names_and_params():
    z = torch.zeros(3)
    with pytest.raises(PrefnoiseError, match="valid losses are sigmoid, ramp"):
        margin_loss("sigmod", z)
    with pytest.raises(PrefnoiseError, match=r"eps must be in \[0, 0.5\)"):
        margin_loss("cdpo", z, eps=0.5)
    with pytest.raises(PrefnoiseError, match="eps"):
        margin_loss("rdpo", z, eps=-0.1)
    with pytest.raises(PrefnoiseError, match="tau must be > 0"):
        margin_loss("ipo", z, tau=0.0)
    with pytest.raises(PrefnoiseError, match="alpha must be > 0"):
        margin_loss("ropo", z, alpha=-1.0)
    with pytest.raises(PrefnoiseError, match="accepts: eps"):
        margin_loss("cdpo", z, tau=1.0)
    with pytest.raises(PrefnoiseError, match="accepts: none"):
        margin_loss("sigmoid", z, eps=0.1)


# --- policy losses -----------------------------------------------------------------------------
# policy chosen −10, policy rejected −14, ref chosen −12, ref rejected −13, β = 0.1:
# R(c) = 0.1·2 = 0.2, R(r) = 0.1·(−1) = −0.1, z = 0.3, unscaled log-ratio margin h = 3.
LOGPS = [torch.tensor([v], dtype=torch.float64) for v in (-10.0, -14.0, -12.0, -13.0)]
POLICY_EXPECTED = [
    ("sympo", {}, 0.4255574832),  # σ(−0.3)
    ("sympo", {"symmetric_loss": "ramp"}, 0.35),  # (1 − 0.3)/2
    ("sympo", {"symmetric_loss": "unhinged"}, 0.7),
    ("dpo", {}, 0.5543552445),  # softplus(−0.3)
    ("cdpo", {"label_smoothing": 0.1}, 0.5843552445),  # 0.9·sp(−0.3) + 0.1·sp(0.3)
    ("rdpo", {"noise_rate": 0.1}, 0.5168552445),  # (0.9·sp(−0.3) − 0.1·sp(0.3)) / 0.8
    # ipo averages each log-ratio over its response tokens (TRL): 2 chosen, 1 rejected token -> h = 2/2 + 1/1 = 2
    ("ipo", {"chosen_tokens": torch.tensor([2.0]), "rejected_tokens": torch.tensor([1.0])}, 9.0),  # (2 − 5)²
    ("ipo", {"tau": 0.5, "chosen_tokens": torch.tensor([2.0]), "rejected_tokens": torch.tensor([1.0])}, 1.0),
    ("ipo", {"tau": 1.0, "chosen_tokens": torch.tensor([1.0]), "rejected_tokens": torch.tensor([1.0])}, 6.25),
    ("drdpo", {}, 0.5543552445),  # per-row DPO ℓ; the batch objective is drdpo_loss
    ("ropo", {}, 1.6208042689),  # 56/225·sp(−0.3) + 784/225·σ(−0.3)
    ("hinge", {}, 0.7),  # relu(1 − 0.3)
]


def test_every_policy_loss_has_hand_values():
    assert {name for name, _, _ in POLICY_EXPECTED} == set(POLICY_LOSSES)


@pytest.mark.parametrize("name,kwargs,expected", POLICY_EXPECTED)
def test_preference_loss_hand_values(name, kwargs, expected):
    losses, chosen, rejected = preference_loss(name, *LOGPS, beta=0.1, **kwargs)
    assert losses.item() == pytest.approx(expected, abs=1e-9)
    assert chosen.item() == pytest.approx(0.2)
    assert rejected.item() == pytest.approx(-0.1)
    assert not chosen.requires_grad and not rejected.requires_grad


def test_sympo_clip_bites_and_stops_the_gradient():
    # R(c) = 0.1·(−10 + 200) = 19 -> clamped to 10; R(r) = 0.1·(−50 + 40) = −1; z = 11.
    pc = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-50.0], dtype=torch.float64, requires_grad=True)
    rc, rr = torch.tensor([-200.0], dtype=torch.float64), torch.tensor([-40.0], dtype=torch.float64)
    losses, chosen, rejected = preference_loss("sympo", pc, pr, rc, rr, beta=0.1)
    assert chosen.item() == 10.0 and rejected.item() == pytest.approx(-1.0)
    assert losses.item() == pytest.approx(1.670142184809518e-05, rel=1e-9)  # σ(−11)
    losses.sum().backward()
    assert pc.grad.item() == 0.0
    assert pr.grad.item() != 0.0
    # clip=None disables it: z = 19 − (−1) = 20
    unclipped, chosen, _ = preference_loss("sympo", pc, pr, rc, rr, beta=0.1, clip=None)
    assert chosen.item() == pytest.approx(19.0)
    assert unclipped.item() == pytest.approx(2.0611536181902037e-09, rel=1e-9)  # σ(−20)
    # other losses never clip
    _, chosen, _ = preference_loss("dpo", pc, pr, rc, rr, beta=0.1)
    assert chosen.item() == pytest.approx(19.0)


def test_implicit_rewards_clamp():
    rewards = implicit_rewards(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([-300.0, 30.0, 0.0]),
                               beta=0.1, clip=10.0)
    assert rewards.tolist() == pytest.approx([10.0, -3.0, 0.0])


def test_preference_loss_errors():
    with pytest.raises(PrefnoiseError, match="unknown policy loss"):
        preference_loss("kto", *LOGPS)
    with pytest.raises(PrefnoiseError, match="beta must be > 0"):
        preference_loss("dpo", *LOGPS, beta=0.0)
    with pytest.raises(PrefnoiseError, match="sympo needs a symmetric loss"):
        preference_loss("sympo", *LOGPS, symmetric_loss="logistic")
    with pytest.raises(PrefnoiseError, match="unknown loss"):
        preference_loss("sympo", *LOGPS, symmetric_loss="nope")
    with pytest.raises(PrefnoiseError, match="eps"):
        preference_loss("rdpo", *LOGPS, noise_rate=0.5)


def test_torch_free_names_match_the_loss_table():
    from prefnoise.loss_names import MARGIN_LOSS_NAMES, POLICY_LOSS_NAMES, SYMMETRIC_LOSS_NAMES
    from prefnoise.losses import MARGIN_LOSSES, POLICY_LOSSES, SYMMETRIC_LOSSES

    assert tuple(MARGIN_LOSSES) == MARGIN_LOSS_NAMES
    assert SYMMETRIC_LOSSES == SYMMETRIC_LOSS_NAMES
    assert POLICY_LOSSES == POLICY_LOSS_NAMES
