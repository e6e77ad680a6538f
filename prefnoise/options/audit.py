"""``audit``'s options: where the evidence comes from (fold models, given margins, other annotators),
the estimate's bootstrap, the breakdowns and the fix."""

from __future__ import annotations

from dataclasses import dataclass

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError
from prefnoise.options.ranges import OptionError, Options

FIX_MODES = ("drop", "swap")
BY_RULES = ("longer", "column:NAME", "compare:NAME")


def _as_tuple(value: object) -> tuple[str, ...] | None:
    """A list option given as one string (``"a,b"``), a sequence, or None."""
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class AuditOptions(Options):
    """``prefnoise audit``: the evidence, in order of preference —

    - ``annotators`` (columns, each one other annotator's vote on the pair) and/or ``votes`` (a long
      table pair_id, annotator, vote): Dawid–Skene over the table's label and those votes; with
      ``position_col`` (which response was shown first) in the position frame, with position bias;
      ``by`` adds per-group flip rates (``longer``, ``column:NAME``, ``compare:NAME``, as corrupt's rules);
    - ``reward_col``/``margin_col``: out-of-sample margins as given;
    - ``gold`` (a column of trusted votes on a random subset, null elsewhere), with the margins given or
      cross-fitted: the gold pairs correct the fold models' scores (prediction-powered inference);
    - otherwise ``folds`` × ``refits`` cross-fitted reward models (``loss``, ``model``, ``encoder``, ``head``,
      ``embed_features``, ``epochs``, ``batch_size``, ``lr``, ``hidden``, ``max_length`` on ``device``).

    ``bootstrap`` resamples give the 95% intervals (seeded by ``seed``); ``show_suspects`` pairs are listed
    (``show_text`` with their text); ``fix`` ("drop" or "swap") acts on pairs with suspicion above
    ``threshold``.
    """

    folds: int = 5
    refits: int = 3
    reward_col: str | None = None
    margin_col: str | None = None
    loss: str = "sigmoid"
    model: str | None = None
    encoder: str | None = None
    head: str | None = None
    embed_features: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    hidden: int = 256
    max_length: int | None = None
    device: str = "auto"
    annotators: tuple[str, ...] | None = None
    votes: str | None = None
    position_col: str | None = None
    by: tuple[str, ...] | None = None
    gold: str | None = None
    bootstrap: int = 200
    show_suspects: int = 10
    show_text: bool = False
    fix: str | None = None
    threshold: float = 0.5
    seed: int = C.DEFAULT_SEED

    def __post_init__(self) -> None:
        object.__setattr__(self, "annotators", _as_tuple(self.annotators) or None)
        object.__setattr__(self, "by", _as_tuple(self.by) or None)
        if self.votes is not None:
            object.__setattr__(self, "votes", str(self.votes))
        super().__post_init__()

    @property
    def with_annotators(self) -> bool:
        """Whether other annotators' votes are the evidence (no fold models are fitted)."""
        return self.annotators is not None or self.votes is not None

    @property
    def given_margins(self) -> bool:
        """Whether out-of-sample margins are given (no fold models are fitted)."""
        return self.reward_col is not None or self.margin_col is not None

    def check(self) -> None:
        """The fix mode, one margin source, breakdown rules, and what annotators exclude or need."""
        if self.fix is not None and self.fix not in FIX_MODES:
            raise OptionError("fix", f"must be 'drop' or 'swap', got {self.fix!r}")
        if self.reward_col is not None and self.margin_col is not None:
            raise PrefnoiseError("give only one of --reward-col and --margin-col")
        for rule in self.by or ():
            kind, _, name = rule.partition(":")
            if not (rule == "longer" or (kind in ("column", "compare") and name)):
                raise OptionError("by", f"unknown rule {rule!r}; use one of: {', '.join(BY_RULES)}")
        if self.with_annotators and self.given_margins:
            name = "reward_col" if self.reward_col is not None else "margin_col"
            raise OptionError(name, "gives margins, but an audit with annotators or votes reads no margins")
        if self.with_annotators and self.gold is not None:
            raise OptionError("gold", "corrects fold models' margins; with annotators or votes give the gold column "
                              "as one more annotator instead")
        if not self.with_annotators and self.gold is None:
            for name in ("position_col", "by"):
                if getattr(self, name) is not None:
                    raise OptionError(name, "needs other annotators' votes (annotators or votes) or a gold column")
