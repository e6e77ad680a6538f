"""Column names the audit adds to a table."""

MARGIN = "oof_margin"  # out-of-fold margin r(chosen) − r(rejected)
SUSPICION = "suspicion"  # probability that the table's label is wrong
FOLD = "fold"  # the cross-fitting fold of the pair (first refit)
CONSENSUS = "consensus"  # the response the annotators' posterior prefers: chosen, rejected or tie
