"""FitRewardConfig: every option of ``prefnoise fit-reward`` / ``pn.fit_reward``, its defaults and rules.

Built once (by the CLI, the API or a caller of :func:`prefnoise.reward.fit_reward_model`) and checked at
construction; the library trusts a built config. Defaults that depend on the backend (epochs, batch
size, learning rate, ...) stay None until :meth:`FitRewardConfig.for_backend` fills them in.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prefnoise import columns as C
from prefnoise.loss_names import MARGIN_LOSS_NAMES, MARGIN_RATE_PARAMS, missing_rate
from prefnoise.options.ranges import OptionError, Options, flag_of
from prefnoise.options.training import DEVICE_PATTERN, RuleError, check_integers, check_training_choices, one_of

# The parameters each margin loss takes (prefnoise.losses.MARGIN_LOSSES, spelled here without torch;
# tests/test_reward.py keeps the two in step).
MARGIN_LOSS_PARAMS: dict[str, tuple[str, ...]] = {"cdpo": ("eps",), "rdpo": ("eps",), "ipo": ("tau",),
                                                 "ropo": ("alpha",)}
LOSS_PARAMS = ("eps", "tau", "alpha")
FEATURE_BACKENDS = ("mlp", "embed+mlp")  # --model values that are not a model directory
HEADS = ("sequence-classification", "pooled")

# Per-backend training defaults; the mlp row follows the paper's synthetic runs (Adam 1e-3, batch 512).
BACKEND_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"epochs": 50, "batch_size": 512, "lr": 1e-3, "max_length": 512},
    "embed+mlp": {"epochs": 50, "batch_size": 512, "lr": 1e-3, "max_length": 256},
    "transformer": {"epochs": 1, "batch_size": 8, "lr": 2e-5, "max_length": 512},
}
# Learning-rate schedule per backend: (schedule, warmup share of the steps). Fine-tuning a pretrained
# transformer takes the usual linear warmup and linear decay to 0; the MLPs keep a constant rate.
SCHEDULE_DEFAULTS: dict[str, tuple[str, float]] = {
    "mlp": ("constant", 0.0),
    "embed+mlp": ("constant", 0.0),
    "transformer": ("linear", 0.1),
}
# Gradient clipping per backend: the paper's MLP runs do not clip; fine-tuning clips at 1.0 as TRL does.
MAX_GRAD_NORM_DEFAULTS = {"mlp": 0.0, "embed+mlp": 0.0, "transformer": 1.0}
# Options that may change between an interrupted run and its --resume without changing the result.
RESUME_FREE = ("device", "save_every", "log_every", "report_to", "cache_dir", "resume")
INTEGERS = ("epochs", "batch_size", "early_stopping", "max_length", "hidden", "layers", "grad_accum", "lora_r",
            "log_every", "save_every", "seed")


@dataclasses.dataclass(frozen=True)
class FitRewardConfig(Options):
    """Every option of fit-reward, with the defaults users get (None: the backend's default).

    ``model``: None or "mlp" (an MLP on feature columns), "embed+mlp" (an MLP on ``encoder`` embeddings),
    or a local transformer directory. ``output_clip`` 0 or None turns the reward clip off.
    """

    loss: str = "sigmoid"
    model: str | None = None
    encoder: str | None = None
    embed_features: str | tuple[str, ...] | None = None
    head: str | None = None
    margin_scale: float = 1.0
    eps: float | None = None
    tau: float | None = None
    alpha: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    early_stopping: int | None = None
    device: str = "auto"
    max_length: int | None = None
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.0
    output_clip: float | None = 20.0
    cache_dir: str | None = None
    schedule: str | None = None
    warmup: float | None = None
    grad_accum: int = 1
    max_grad_norm: float | None = None
    precision: str = "auto"
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    log_every: int = 10
    save_every: int = 0
    resume: bool = False
    report_to: str = "none"
    seed: int = C.DEFAULT_SEED
    drop_invalid: bool = False

    def __post_init__(self) -> None:
        if self.output_clip == 0:  # the CLI's 0 turns the clip off
            object.__setattr__(self, "output_clip", None)
        for name in ("model", "encoder", "cache_dir"):
            if isinstance(getattr(self, name), Path):
                object.__setattr__(self, name, str(getattr(self, name)))
        super().__post_init__()

    @property
    def backend(self) -> str:
        """mlp, embed+mlp or transformer (a model directory)."""
        return "mlp" if self.model is None else self.model if self.model in FEATURE_BACKENDS else "transformer"

    @property
    def loss_params(self) -> dict[str, float]:
        """The loss parameters given (eps, tau, alpha; unset ones left out)."""
        return {name: getattr(self, name) for name in LOSS_PARAMS if getattr(self, name) is not None}

    def check(self) -> None:
        """The rules between options (ranges were checked by the base)."""
        check_integers(self, INTEGERS)
        if self.loss not in MARGIN_LOSS_NAMES:
            raise RuleError("loss", f"unknown loss={self.loss!r}; valid losses are {', '.join(MARGIN_LOSS_NAMES)}",
                            f"unknown --loss {self.loss!r}; choose one of: {', '.join(MARGIN_LOSS_NAMES)}")
        self._check_loss_params()
        if not DEVICE_PATTERN.fullmatch(str(self.device)):
            raise OptionError("device", f"must be auto, cpu or cuda, got {self.device!r}")
        check_training_choices(self)
        if self.head is not None:
            one_of("head", self.head, HEADS)
        for name in ("encoder", "embed_features"):
            if getattr(self, name) is not None and self.model != "embed+mlp":
                raise RuleError(name, f"{name}= applies to model='embed+mlp' only",
                                f"{flag_of(name)} applies to --model embed+mlp only")
        if self.model == "embed+mlp" and self.encoder is None:
            raise RuleError("encoder", "model='embed+mlp' needs encoder= (a local HF encoder directory)",
                            "--model embed+mlp needs --encoder PATH (a local HF encoder directory)")
        if self.lora_r and self.backend != "transformer":
            raise RuleError("lora_r", "lora_r= applies to a transformer model= only (the MLP backends train "
                            "every weight)", "--lora-r applies to a transformer --model only (the MLP backends "
                            "train every weight)")

    def _check_loss_params(self) -> None:
        accepted = MARGIN_LOSS_PARAMS.get(self.loss, ())
        extra = [name for name in self.loss_params if name not in accepted]
        if extra:
            raise RuleError(extra[0], f"loss={self.loss!r} does not use {', '.join(f'{k}=' for k in extra)}; it "
                            f"takes {', '.join(f'{k}=' for k in accepted) or 'no parameters'}",
                            f"--loss {self.loss} does not use {', '.join(flag_of(k) for k in extra)}; it takes "
                            f"{', '.join(flag_of(k) for k in accepted) or 'no parameters'}")
        missing = missing_rate(self.loss, self.loss_params, MARGIN_RATE_PARAMS)  # cdpo/rdpo: ε has no default
        if missing:
            name = MARGIN_RATE_PARAMS[self.loss]
            raise RuleError(name, missing.replace(f"--loss {self.loss}", f"loss={self.loss!r}")
                            .replace(flag_of(name), f"{name}="), missing)
        if self.eps is not None and not 0 <= self.eps < 0.5:
            raise OptionError("eps", f"must be in [0, 0.5) (a flip rate / label smoothing), got {self.eps}")

    def for_backend(self) -> FitRewardConfig:
        """This config with the backend's defaults in place of every None that has one."""
        backend = self.backend
        filled = {name: value for name, value in BACKEND_DEFAULTS[backend].items() if getattr(self, name) is None}
        if self.schedule is None:
            filled["schedule"] = SCHEDULE_DEFAULTS[backend][0]
        if self.warmup is None:
            filled["warmup"] = SCHEDULE_DEFAULTS[backend][1]
        if self.max_grad_norm is None:
            filled["max_grad_norm"] = MAX_GRAD_NORM_DEFAULTS[backend]
        return dataclasses.replace(self, **filled) if filled else self


LIBRARY_SPELLINGS = ("backend", "model_path", "encoder_path", "loss_params")


def fit_reward_config(**options: Any) -> FitRewardConfig:
    """A FitRewardConfig from keyword options, also in the library's own spellings: ``backend`` with
    ``model_path`` (for ``model``), ``encoder_path`` (``encoder``) and ``loss_params`` (eps, tau, alpha)."""
    backend, model_path = options.pop("backend", None), options.pop("model_path", None)
    if model_path is not None or backend not in (None, "mlp"):
        options["model"] = str(model_path) if backend == "transformer" and model_path is not None else backend
        if backend == "transformer" and model_path is None:
            raise RuleError("model_path", "backend='transformer' needs model_path= (a local HF model directory)",
                            "the transformer backend needs --model PATH (a local HF model directory)")
        if backend not in ("transformer", *FEATURE_BACKENDS):
            raise RuleError("backend", f"unknown backend={backend!r}; use mlp, embed+mlp or transformer",
                            f"unknown backend {backend!r}; use mlp, embed+mlp or transformer")
    if "encoder_path" in options:
        options["encoder"] = options.pop("encoder_path")
    for name, value in (options.pop("loss_params", None) or {}).items():
        if name not in LOSS_PARAMS:
            raise RuleError(name, f"unknown loss parameter {name}=", f"unknown option {flag_of(name)}")
        options[name] = value
    return FitRewardConfig(**options)
