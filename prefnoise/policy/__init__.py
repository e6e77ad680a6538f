"""Preference optimization of a causal LM (``prefnoise align``): SymPO and the DPO family.

Modules: ``trainer`` (:func:`train`), ``plan`` (what a run will do, before anything is written),
``objective`` (losses, records, evaluation), ``reference`` (the reference pass and its cache),
``logprobs`` (tokenizing pairs, sequence log-probs, the cache file), ``models`` (loading and saving the
policy), ``fingerprints`` (what a resumed run must match). Options: :class:`prefnoise.options.align.AlignConfig`.
"""

from prefnoise.batching import epoch_permutation
from prefnoise.options.align import AlignConfig, default_max_prompt_length
from prefnoise.policy.fingerprints import check_resumable, data_fingerprint, model_fingerprint
from prefnoise.policy.models import check_causal_lm, load_policy, load_tokenizer
from prefnoise.policy.objective import learning_rate, loss_of, response_tokens, reward_accuracy
from prefnoise.policy.plan import Plan, Prepared, batch_schedule, check_pair_ids, make_plan, prepare, step_rows
from prefnoise.policy.reference import REF_CACHE_FILE, assemble_reference
from prefnoise.policy.trainer import MODEL_DIR, SUMMARY_FILE, train

__all__ = [
    "MODEL_DIR", "REF_CACHE_FILE", "SUMMARY_FILE", "AlignConfig", "Plan", "Prepared", "assemble_reference",
    "batch_schedule", "check_causal_lm", "check_pair_ids", "check_resumable", "data_fingerprint",
    "default_max_prompt_length", "epoch_permutation", "learning_rate", "load_policy", "load_tokenizer", "loss_of",
    "make_plan", "model_fingerprint", "prepare", "response_tokens", "reward_accuracy", "step_rows", "train",
]
