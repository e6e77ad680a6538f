"""How noisy are a preference table's labels, and which pairs are suspect? (the `audit` command's library).

One module per job: :mod:`~prefnoise.noise_audit.run` (one audit under its options),
:mod:`~prefnoise.noise_audit.cross_fit` (out-of-fold margins),
:mod:`~prefnoise.noise_audit.estimate` (the single-label estimator and its verdict),
:mod:`~prefnoise.noise_audit.difficulty` (whether flips depend on difficulty),
:mod:`~prefnoise.noise_audit.gold` (a small gold set corrects the fold models),
:mod:`~prefnoise.noise_audit.votes` (other annotators' votes: encodings, long tables),
:mod:`~prefnoise.noise_audit.dawid_skene` (the EM and its bootstrap),
:mod:`~prefnoise.noise_audit.annotators` (the audit by other annotators),
:mod:`~prefnoise.noise_audit.breakdowns` (flip rates per group),
:mod:`~prefnoise.noise_audit.fix` (suspicion, --fix, most suspect pairs) and
:mod:`~prefnoise.noise_audit.ranking` (AUROC, precision at k).
"""

from prefnoise.noise_audit.annotators import AnnotatorAudit, audit_with_annotators
from prefnoise.noise_audit.cross_fit import cross_fitted_margins, given_margins, out_of_fold_margins, refit_seed
from prefnoise.noise_audit.estimate import (
    HELP_MORE,
    MAX_INTERVAL_WIDTH,
    MAX_OWN_ERROR,
    MIN_CONFIDENT_PAIRS,
    PROFILE_DROP,
    SLOPES,
    UNDETERMINED_EXIT,
    MirrorMixture,
    NoiseEstimate,
    OwnErrorFit,
    corrected_rate,
    estimate_noise_rate,
    fit_mirror_mixture,
    fit_own_error,
    identifiability_reason,
    mirror_tail_rate,
    own_error_share,
    wrong_sign_probability,
)
from prefnoise.noise_audit.fix import add_suspicion, clean_table, most_suspect
from prefnoise.noise_audit.names import FOLD, MARGIN, SUSPICION
from prefnoise.noise_audit.ranking import auroc, precision_at

__all__ = [
    "AnnotatorAudit",
    "audit_with_annotators",
    "FOLD",
    "HELP_MORE",
    "MARGIN",
    "MAX_INTERVAL_WIDTH",
    "MAX_OWN_ERROR",
    "MIN_CONFIDENT_PAIRS",
    "PROFILE_DROP",
    "SLOPES",
    "SUSPICION",
    "UNDETERMINED_EXIT",
    "MirrorMixture",
    "NoiseEstimate",
    "OwnErrorFit",
    "add_suspicion",
    "auroc",
    "clean_table",
    "corrected_rate",
    "cross_fitted_margins",
    "estimate_noise_rate",
    "fit_mirror_mixture",
    "fit_own_error",
    "given_margins",
    "identifiability_reason",
    "mirror_tail_rate",
    "most_suspect",
    "out_of_fold_margins",
    "own_error_share",
    "precision_at",
    "refit_seed",
    "wrong_sign_probability",
]
