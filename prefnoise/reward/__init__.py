"""Reward models trained on preference pairs with margin losses: fit, save, load, score.

result = fit_reward_model(df, loss="sigmoid", backend="mlp")
save_reward_model(result, "rm/", history=[...])
scored = score_table(load_reward_model("rm/"), df)   # + chosen_reward / rejected_reward
"""

from __future__ import annotations

from prefnoise.reward.models import BACKENDS, RewardModel, load_reward_model
from prefnoise.reward.split import fold_of_pair_id, split_by_pair_id
from prefnoise.reward.train import (
    BACKEND_DEFAULTS,
    FitResult,
    fit_reward_model,
    pairwise_accuracy,
    resolve_device,
    save_reward_model,
    score_responses,
    score_table,
)
from prefnoise.reward.validate import check_finite_features

__all__ = [
    "BACKENDS",
    "BACKEND_DEFAULTS",
    "FitResult",
    "RewardModel",
    "check_finite_features",
    "fit_reward_model",
    "fold_of_pair_id",
    "load_reward_model",
    "pairwise_accuracy",
    "resolve_device",
    "save_reward_model",
    "score_responses",
    "score_table",
    "split_by_pair_id",
]
