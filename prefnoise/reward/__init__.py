"""Reward models trained on preference pairs with margin losses: fit, save, load, score.

result = fit_reward_model(df, loss="sigmoid", backend="mlp")
save_reward_model(result, "rm/", history=[...])
scored = score_table(load_reward_model("rm/"), df)   # + chosen_reward / rejected_reward

Modules: ``models`` (the base, mlp, reward_config.json), ``embed`` (embed+mlp), ``transformer`` (HF models,
also ones prefnoise did not train), ``networks``, ``tokens``, ``loading``, ``cache`` and ``store`` (embeddings),
``task`` (training one), ``fitting`` (fit_reward_model), ``scoring``, ``validate`` (finite features).
"""

from __future__ import annotations

from prefnoise.options.fit_reward import BACKEND_DEFAULTS
from prefnoise.reward.fitting import FitResult, fit_reward_model, save_reward_model
from prefnoise.reward.loading import load_reward_model
from prefnoise.reward.models import BACKENDS, RewardModel
from prefnoise.reward.scoring import pairwise_accuracy, score_responses, score_table
from prefnoise.reward.validate import check_finite_features
from prefnoise.training import fold_of_pair_id, resolve_device, split_by_pair_id

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
