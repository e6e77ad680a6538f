"""The single-label verdict under instance-dependent noise: covered, or declined with its reason and bounds."""

from __future__ import annotations

import numpy as np
import pytest

from prefnoise.noise import judge_flip_probability, wilson_interval
from prefnoise.noise_audit import difficulty as D
from prefnoise.noise_audit import estimate_noise_rate


def judged_margins(
    seed: int, *, pairs: int = 2000, strength: float = 1.5, temperature: float = 0.5, length_bias: float = 0.0,
    learnt: float = 0.0, refits: int = 2,
) -> tuple[np.ndarray, float]:
    """Out-of-fold margins (refits × pairs) of fold models trained on a judge's labels, drawn directly: true margins
    half-normal × ``strength``; the judge flips with ``judge_flip_probability`` (close pairs and, with
    ``length_bias``, pairs whose better response is the shorter); the models see quality with noise 0.4 plus
    ``learnt`` × "the label's chosen is the longer" (they learnt the judge's length preference). Returns the
    margins and the realized flip rate."""
    rng = np.random.default_rng(seed)
    true_margin = np.abs(rng.normal(0, 1, pairs)) * strength
    better_is_longer = rng.random(pairs) < 0.5
    flip = judge_flip_probability(true_margin, temperature, ~better_is_longer, length_bias)
    flipped = rng.random(pairs) < flip
    quality = true_margin + rng.normal(0, 0.4, pairs)
    chosen_is_longer = np.where(flipped, ~better_is_longer, better_is_longer)
    margins = np.where(flipped, -quality, quality) + learnt * np.where(chosen_is_longer, 1.0, -1.0)
    return np.stack([margins + rng.normal(0, 0.1, pairs) for _ in range(refits)]), float(flipped.mean())


# ---- the profile and the note, by hand -------------------------------------------------------------


def test_difficulty_profile_by_hand():
    margins = np.array([-0.5, 0.4, -0.3, 0.2, 2.0, 3.0, -4.0, 5.0])  # median |m| = 1.25
    profile = D.difficulty_profile(margins)
    assert (profile.close_share, profile.confident_share) == (0.5, 0.25)  # 2 of the 4 close, 1 of the 4 confident
    assert profile.ratio == 2.0 and profile.disagreement == 0.375
    # Wilson for 3 of 8: centre (0.375 + 3.8415/16)/1.4802 = 0.41555,
    # half 1.96·sqrt(0.029297 + 0.015006)/1.4802 = 0.27871
    assert profile.disagreement_high == pytest.approx(0.69426, abs=1e-4)
    assert (profile.close_low, profile.close_high) == pytest.approx(wilson_interval(2, 4))
    assert (profile.close_pairs, profile.confident_pairs) == (4, 4)


def test_profile_of_refits_counts_every_refit_and_ties_half():
    margins = np.array([[1.0, -1.0, 0.0, 2.0], [1.0, 1.0, 0.0, 2.0]])
    profile = D.difficulty_profile(margins)
    assert profile.disagreement == pytest.approx((1 + 0.5 + 0.5) / 8)  # one negative, two zeros counting 1/2


def profile(close, confident, disagreement_high, pairs=1000):
    return D.DifficultyProfile(
        *D.share_with_interval(close * pairs, pairs), *D.share_with_interval(confident * pairs, pairs),
        disagreement=(close + confident) / 2, disagreement_high=disagreement_high, close_pairs=pairs,
        confident_pairs=pairs,
    )


def test_close_pair_note():
    # close pairs 0.30 vs confident 0.05 (significant), the disagreement reaches 0.20 above a mirror high of 0.08
    note = D.close_pair_note(profile(0.30, 0.05, 0.20), low=0.02, high=0.08)
    assert "6.0 times as often" in note and "at least 0.020" in note and "at most 0.200" in note
    assert D.close_pair_note(profile(0.30, 0.05, 0.12), low=0.02, high=0.08) is None  # within MAX_HIDDEN
    assert D.close_pair_note(profile(0.30, 0.05, 0.20, pairs=12), low=0.02, high=0.08) is None  # not significant
    assert D.close_pair_note(profile(0.05, 0.30, 0.40), low=0.02, high=0.08) is None  # confident pairs disagree more


def test_two_proportion_p_value_by_hand():
    # 0.30 vs 0.20 of 100 each: pooled 0.25, se = sqrt(0.25·0.75·0.02) = 0.06124, z = 1.633, p = 0.1025
    assert profile(0.30, 0.20, 0.3, pairs=100).p_value == pytest.approx(0.1025, abs=1e-3)


# ---- the verdict ----------------------------------------------------------------------------------


def test_mirrored_noise_on_a_strong_model_keeps_its_interval():
    rng = np.random.default_rng(0)
    clean = np.abs(rng.normal(size=4000)) * 2 + rng.normal(0, 0.3, 4000)
    flipped = rng.random(4000) < 0.2
    estimate = estimate_noise_rate(np.where(flipped, -clean, clean), n_boot=50)
    assert estimate.identifiable and estimate.close_pairs_note is None
    assert estimate.low <= flipped.mean() <= estimate.high and estimate.high - estimate.low < 0.05
    assert estimate.at_least == estimate.low and estimate.at_most >= flipped.mean()


def test_the_mirror_interval_alone_misses_close_pair_flips():
    """What the verdict guards against: on close-pair noise the mirror count reads about 0 (truth about 0.13)."""
    margins, truth = judged_margins(1, strength=2.0)
    estimate = estimate_noise_rate(margins, n_boot=30, seed=1)
    assert truth > 0.1 and estimate.tail_share < 0.05  # few confident pairs disagree: the flips sit below the cut
    assert estimate.difficulty["ratio"] > 3
    assert estimate.identifiable and estimate.rate < 0.02  # the count the models can see
    assert "close pairs disagree" in estimate.close_pairs_note  # ...so the interval reaches up to the disagreement
    assert estimate.low <= truth <= estimate.high == estimate.at_most


@pytest.mark.parametrize(
    ("case", "options"),
    [
        ("close pairs flip (T = 0.5)", {"temperature": 0.5}),
        ("close pairs flip, weaker models", {"strength": 1.0, "temperature": 0.5}),
        ("a judge preferring the longer answer, learnt by the models", {"length_bias": 0.2, "learnt": 0.5}),
        ("a strong length bias, strongly learnt", {"length_bias": 0.3, "learnt": 1.0}),
    ],
)
def test_covered_or_declined_under_instance_dependent_noise(case, options):
    """In at least 95% of 30 simulated datasets per case the 95% interval covers the realized rate or the rate is
    declined (undetermined, with its reason); a declined rate keeps a valid "at least"."""
    ok = declined = 0
    for seed in range(30):
        margins, truth = judged_margins(seed, **options)
        estimate = estimate_noise_rate(margins, n_boot=30, seed=seed)
        if estimate.identifiable:
            ok += estimate.low <= truth <= estimate.high
        else:
            declined += 1
            ok += 1
            assert estimate.rate is None and estimate.reason
            assert estimate.at_least is None or estimate.at_least <= truth
    assert ok >= 29, (case, ok)
