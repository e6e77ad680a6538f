"""AlignConfig: every option of ``prefnoise align`` / ``pn.align``, its defaults and rules.

Checked once, at construction; :mod:`prefnoise.policy` trusts a built config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefnoise import columns as C
from prefnoise.loss_names import POLICY_LOSS_NAMES, POLICY_RATE_OPTIONS, SYMMETRIC_LOSS_NAMES, missing_rate
from prefnoise.options.ranges import OptionError, Options, flag_of
from prefnoise.options.training import RuleError, check_integers, check_training_choices, one_of

DEVICES = ("auto", "cpu", "cuda")
BATCHING_MODES = ("exact", "group")  # prefnoise.batching: "exact" is the plain shuffled order
# Options that may change between an interrupted run and its --resume without changing the result.
RESUME_FREE = ("out", "resume", "save_every", "log_every", "eval_every", "ref_cache", "device", "report_to")
# What a checkpoint written before an option existed ran with.
LEGACY_OPTIONS = {"batching": "exact", "max_tokens_per_batch": None}
INTEGERS = ("warmup_steps", "batch_size", "grad_accum", "epochs", "max_steps", "seed", "max_length",
            "max_prompt_length", "lora_r", "save_every", "eval_every", "log_every", "max_tokens_per_batch")
FLOATS = ("beta", "clip", "label_smoothing", "noise_rate", "tau", "alpha", "beta_prime", "lr", "weight_decay",
          "max_grad_norm", "lora_alpha", "lora_dropout", "val_fraction")


def default_max_prompt_length(max_length: int) -> int:
    """Prompt tokens kept when ``--max-prompt-length`` is not given: 256, or half of a shorter --max-length."""
    return min(256, max_length // 2)


@dataclasses.dataclass(frozen=True)
class AlignConfig(Options):
    """Every option of ``prefnoise align``; plain values with the defaults users get.

    ``clip`` 0 or None turns SymPO's clip off; ``max_prompt_length`` None is
    :func:`default_max_prompt_length` of ``max_length``.
    """

    model: str
    out: str
    loss: str = "sympo"
    symmetric_loss: str = "sigmoid"
    beta: float = 0.1
    clip: float | None = 10.0  # SymPO's bound on each implicit reward
    label_smoothing: float | None = None  # cdpo's ε: required for cdpo, no default
    noise_rate: float | None = None  # rdpo's ε: required for rdpo, no default
    noise_rate_from: str | None = None  # cdpo/rdpo: take ε from an audit's --json file instead
    tau: float | None = None  # ipo; None means β
    alpha: float = 14.0  # ropo
    beta_prime: float = 1.0  # drdpo's β′ (Dr. DPO's default)
    lr: float = 5e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    batch_size: int = 8
    batching: str = "group"  # prefnoise.batching: "exact" is the plain shuffled order (loss-parity tests)
    max_tokens_per_batch: int | None = None  # group mode: padded tokens per micro-batch instead of batch_size
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    seed: int = C.DEFAULT_SEED
    max_length: int = 512
    max_prompt_length: int | None = None  # None: min(256, max_length // 2)
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    save_adapter: bool = False
    save_every: int = 0
    resume: bool = False
    ref_cache: str | None = None
    val_fraction: float = 0.0
    eval_every: int = 0  # 0: evaluate before training and at the end only
    log_every: int = 10
    precision: str = "auto"
    gradient_checkpointing: bool = False
    device: str = "auto"
    report_to: str = "none"  # trackers logging under out/runs

    def __post_init__(self) -> None:
        for name in ("model", "out", "ref_cache", "noise_rate_from"):
            if isinstance(getattr(self, name), Path):
                object.__setattr__(self, name, str(getattr(self, name)))
        if self.clip == 0:  # the CLI's 0 turns the clip off
            object.__setattr__(self, "clip", None)
        if self.max_prompt_length is None and isinstance(self.max_length, int) and not isinstance(
                self.max_length, bool):
            object.__setattr__(self, "max_prompt_length", default_max_prompt_length(self.max_length))
        super().__post_init__()

    def check(self) -> None:
        """The rules between options (ranges were checked by the base)."""
        one_of("loss", self.loss, POLICY_LOSS_NAMES)
        one_of("symmetric_loss", self.symmetric_loss, SYMMETRIC_LOSS_NAMES)
        for name in FLOATS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise OptionError(name, f"must be a finite number, got {value}")
        check_integers(self, INTEGERS)
        if self.noise_rate_from is not None and self.loss not in POLICY_RATE_OPTIONS:
            raise RuleError("noise_rate_from", f"noise_rate_from= applies to the losses that need a flip rate "
                            f"({', '.join(POLICY_RATE_OPTIONS)}), not loss={self.loss!r}",
                            f"--noise-rate-from applies to --loss {' or '.join(POLICY_RATE_OPTIONS)}, "
                            f"not --loss {self.loss}")
        missing = missing_rate(self.loss, dataclasses.asdict(self), POLICY_RATE_OPTIONS)
        if missing and self.noise_rate_from is None:  # the API reads the rate from the audit before training
            name = POLICY_RATE_OPTIONS[self.loss]
            raise RuleError(name, missing.replace(f"--loss {self.loss}", f"loss={self.loss!r}")
                            .replace(flag_of(name), f"{name}="), missing)
        one_of("batching", self.batching, BATCHING_MODES)
        if self.max_tokens_per_batch is not None and self.batching == "exact":
            raise RuleError("max_tokens_per_batch", "max_tokens_per_batch= needs batching='group' (exact keeps "
                            "fixed batches of batch_size=)", "--max-tokens-per-batch needs --batching group "
                            "(exact keeps fixed batches of --batch-size)")
        if not 0 <= self.max_prompt_length < self.max_length:
            raise RuleError("max_prompt_length", f"max_prompt_length= must be in [0, max_length={self.max_length}), "
                            f"got {self.max_prompt_length}", f"--max-prompt-length must be in [0, --max-length="
                            f"{self.max_length}), got {self.max_prompt_length}")
        check_training_choices(self)
        one_of("device", self.device, DEVICES)
        if self.save_adapter and self.lora_r == 0:
            raise RuleError("save_adapter", "save_adapter=True needs a LoRA run (lora_r= > 0)",
                            "--save-adapter needs a LoRA run (--lora-r > 0)")
