"""audit at the cost of about one fit: the fold models trained as one stack (the same numbers as separate fits,
no leakage between folds), the vectorised bootstrap, and margins reused only when data and options match."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import prefnoise as pn
from prefnoise import noise_audit as A
from prefnoise.cli import app
from prefnoise.data import canonicalize, write_table
from prefnoise.noise import NoiseSpec, corrupt_frame, swap_responses
from prefnoise.noise_audit import reuse as R
from prefnoise.noise_audit.estimate import bootstrap_tail_rates
from tests.conftest import make_feature_pairs

runner = CliRunner()
FIT = {"epochs": 6, "hidden": 16, "val_fraction": 0.0, "batch_size": 64}
# Stacked and separate fits do the same float32 arithmetic in another order (a batched matrix product per
# layer instead of one per model, the mean loss of a member over its rows instead of over one batch), so
# margins of about ±2 after 6 epochs of Adam differ by round-off, observed 2e-5; 1e-4 leaves room for
# other BLAS builds while a real difference (another shuffle, init or loss) moves them by 0.01 or more.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def noisy():
    clean = canonicalize(make_feature_pairs(420, seed=3))[0]
    return corrupt_frame(clean, NoiseSpec(kind="symmetric", rate=0.2, seed=5))[0]


def test_stacked_fold_models_give_the_separate_fits_margins(noisy):
    stacked = A.cross_fitted_margins(noisy, folds=3, refits=2, seed=7, fit_options=FIT, device="cpu")
    separate = A.cross_fitted_margins(noisy, folds=3, refits=2, seed=7, fit_options=FIT, device="cpu", stacked=False)
    assert stacked[1].shape == separate[1].shape == (2, noisy.height)
    assert (stacked[0][A.FOLD] == separate[0][A.FOLD]).all()
    assert np.abs(stacked[1] - separate[1]).max() < TOLERANCE
    assert np.abs(separate[1]).max() > 0.5  # the models learned something: the comparison is not of zeros
    other_seed = A.cross_fitted_margins(noisy, folds=3, refits=2, seed=8, fit_options=FIT, device="cpu")
    assert np.abs(other_seed[1] - separate[1]).max() > 100 * TOLERANCE  # the tolerance tells fits apart


def test_a_fold_model_never_sees_its_held_out_labels(noisy):
    """Swapping the labels of fold 0's pairs changes the other folds' models (they train on those pairs) but
    not fold 0's: its out-of-fold margins only turn round with the orientation."""
    before = A.out_of_fold_margins(noisy, folds=3, seed=11, fit_options=FIT, device="cpu")
    held_out = before[A.FOLD].to_numpy() == 0
    after = A.out_of_fold_margins(swap_responses(noisy, held_out), folds=3, seed=11, fit_options=FIT, device="cpu")
    assert (after[A.FOLD] == before[A.FOLD]).all()
    old, new = before[A.MARGIN].to_numpy(), after[A.MARGIN].to_numpy()
    np.testing.assert_allclose(new[held_out], -old[held_out], atol=1e-6)
    assert np.abs(new[~held_out] - old[~held_out]).max() > 0.01  # the other folds' models did change


def test_options_that_couple_the_members_fall_back_to_separate_fits():
    from prefnoise.options.fit_reward import fit_reward_config
    from prefnoise.reward.folds import stackable

    assert stackable(fit_reward_config(val_fraction=0.0).for_backend()) is None
    assert "gradient clipping" in stackable(fit_reward_config(val_fraction=0.0, max_grad_norm=1.0).for_backend())
    assert "dropout" in stackable(fit_reward_config(val_fraction=0.0, dropout=0.1).for_backend())
    assert "validation" in stackable(fit_reward_config(val_fraction=0.1).for_backend())


def test_stack_member_is_a_plain_mlp():
    import torch

    from prefnoise.reward.folds import StackedMLP
    from prefnoise.reward.networks import FeatureMLP

    torch.manual_seed(0)
    members = [FeatureMLP(5, 7, 2, 0.0, 20.0) for _ in range(3)]
    stack = StackedMLP(members)
    x = torch.randn(3, 11, 5)
    with torch.no_grad():
        together = stack(x)
        for k, member in enumerate(members):
            torch.testing.assert_close(together[k], member(x[k]), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(stack.member(k)(x[k]), member(x[k]), atol=1e-6, rtol=1e-6)


def test_vectorised_bootstrap_draws_the_same_resamples():
    m = np.random.default_rng(0).normal(1.0, 1.0, 301)
    m[:4] = 0.0
    loop_rng, block_rng = np.random.default_rng(4), np.random.default_rng(4)
    by_hand = np.array([A.mirror_tail_rate(m[loop_rng.integers(0, m.size, m.size)]) for _ in range(120)])
    np.testing.assert_array_equal(bootstrap_tail_rates(m, 120, block_rng), by_hand)
    assert 0.0 < by_hand.min() < by_hand.max() < 0.5


def test_margins_reused_only_when_data_and_options_match(noisy, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFNOISE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "noisy.parquet"
    write_table(noisy, path)
    options = {"folds": 3, "refits": 1, "epochs": 4, "hidden": 16, "device": "cpu", "bootstrap": 0}
    first = pn.audit(path, reuse_margins=True, **options)
    assert first.summary["margins_note"].startswith("no margins of a previous audit")
    again = pn.audit(path, reuse_margins=True, **options)
    assert again.summary["margins_note"].startswith("reused the out-of-fold margins")
    np.testing.assert_array_equal(again.table[A.MARGIN].to_numpy(), first.table[A.MARGIN].to_numpy())
    assert "margins_note" not in pn.audit(path, **options).summary  # a plain audit fits (and keeps) them
    changed = pn.audit(path, reuse_margins=True, **{**options, "epochs": 5})
    assert "other data or options" in changed.summary["margins_note"]
    write_table(swap_responses(noisy, np.arange(noisy.height) == 0), path, overwrite=True)  # one label changed
    relabelled = pn.audit(path, reuse_margins=True, **{**options, "epochs": 5})
    assert "other data or options" in relabelled.summary["margins_note"]
    assert relabelled.table[A.MARGIN][0] != changed.table[A.MARGIN][0]


def test_a_stale_or_damaged_margins_file_is_never_trusted(noisy, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFNOISE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "noisy.parquet"
    write_table(noisy, path)
    options = {"folds": 3, "refits": 1, "epochs": 4, "hidden": 16, "device": "cpu", "bootstrap": 0}
    first = pn.audit(path, **options)
    slot = R.slot_path(str(path))
    with np.load(slot) as kept:
        fingerprint, fold, margins = str(kept["fingerprint"]), kept["fold"], kept["margins"]
    R.keep_margins(slot, fingerprint, noisy.reverse(), fold, margins + 1.0)  # right fingerprint, wrong pairs
    stale = pn.audit(path, reuse_margins=True, **options)
    assert "do not match this table's pairs" in stale.summary["margins_note"]
    np.testing.assert_allclose(stale.table[A.MARGIN].to_numpy(), first.table[A.MARGIN].to_numpy(), atol=1e-6)
    slot.write_bytes(b"not an npz")
    damaged = pn.audit(path, reuse_margins=True, **options)
    assert "unreadable" in damaged.summary["margins_note"]


def test_estimate_only_says_in_one_line_that_it_reused_the_margins(noisy, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFNOISE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "noisy.parquet"
    write_table(noisy, path)
    args = ["audit", str(path), "--folds", "3", "--refits", "1", "--epochs", "4", "--hidden", "16",
            "--device", "cpu", "--bootstrap", "0", "--json"]
    assert runner.invoke(app, args).exit_code == 0
    only = runner.invoke(app, [*args[:-1], "--estimate-only"])
    assert only.exit_code in (0, 4), only.output
    lines = [line for line in only.stderr.splitlines() if line.startswith("audit: ")]
    assert len(lines) == 1 and "reused the out-of-fold margins" in lines[0]
