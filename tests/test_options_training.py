"""The options objects of fit-reward and align: every default and rule in one frozen object, checked once."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from prefnoise.options import OptionError
from prefnoise.options.align import AlignConfig
from prefnoise.options.fit_reward import MARGIN_LOSS_PARAMS, FitRewardConfig, fit_reward_config
from tests.option_helpers import option_error


def test_fit_reward_defaults_follow_the_backend():
    mlp = FitRewardConfig().for_backend()
    assert (mlp.backend, mlp.epochs, mlp.batch_size, mlp.lr, mlp.schedule, mlp.warmup, mlp.max_grad_norm) == (
        "mlp", 50, 512, 1e-3, "constant", 0.0, 0.0)
    lm = FitRewardConfig(model="some/dir", epochs=3).for_backend()
    assert (lm.backend, lm.epochs, lm.batch_size, lm.lr, lm.schedule, lm.warmup, lm.max_grad_norm) == (
        "transformer", 3, 8, 2e-5, "linear", 0.1, 1.0)  # a given value stays
    assert FitRewardConfig(model="embed+mlp", encoder="enc").for_backend().max_length == 256


def test_zero_turns_the_clips_off_and_objects_are_frozen():
    assert FitRewardConfig(output_clip=0).output_clip is None
    assert AlignConfig(model="m", out="o", clip=0).clip is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        FitRewardConfig().lr = 1.0  # type: ignore[misc]
    assert AlignConfig(model="m", out="o").replace(max_length=1024).max_prompt_length == 256  # filled once, kept


def test_one_rule_per_option_names_the_keyword_or_the_flag():
    for build in (lambda: FitRewardConfig(lora_dropout=1.0), lambda: AlignConfig(model="m", out="o", lora_dropout=1.0)):
        with pytest.raises(OptionError) as raised:
            build()
        assert str(raised.value) == "lora_dropout= must be in [0, 1), got 1"
        assert raised.value.as_flag() == "--lora-dropout must be in [0, 1), got 1"
    with option_error(r"^--max-prompt-length must be in \[0, --max-length=64\), got 256$",
                      r"^max_prompt_length= must be in \[0, max_length=64\), got 256$"):
        AlignConfig(model="m", out="o", max_length=64, max_prompt_length=256)
    with option_error("^--encoder applies to --model embed\\+mlp only$", "^encoder= applies to model='embed\\+mlp'"):
        FitRewardConfig(encoder="enc")
    with option_error("^--save-adapter needs a LoRA run", "^save_adapter=True needs a LoRA run"):
        AlignConfig(model="m", out="o", save_adapter=True)
    with option_error("^--batch-size must be an integer, got 2.5$", "^batch_size= must be an integer"):
        FitRewardConfig(batch_size=2.5)


def test_the_library_spellings_build_the_same_config():
    given = fit_reward_config(backend="transformer", model_path="lm", encoder_path=None, loss="ipo",
                              loss_params={"tau": 0.2, "eps": None})
    assert given == FitRewardConfig(model="lm", loss="ipo", tau=0.2)
    assert given.loss_params == {"tau": 0.2}
    assert fit_reward_config(backend="mlp") == FitRewardConfig()


def test_the_loss_parameter_table_is_the_losses_own():
    from prefnoise.losses import MARGIN_LOSSES

    assert {name: entry.params for name, entry in MARGIN_LOSSES.items() if entry.params} == MARGIN_LOSS_PARAMS


def test_the_python_api_shows_every_option_in_its_signature():
    import prefnoise as pn

    for call, options in ((pn.fit_reward, FitRewardConfig), (pn.align, AlignConfig)):
        shown = inspect.signature(call).parameters
        assert {f.name for f in dataclasses.fields(options)} <= set(shown)
        assert shown["lr"].default == {f.name: f.default for f in dataclasses.fields(options)}["lr"]


def imported_modules(package: str) -> dict[str, set[str]]:
    """Per module of ``package`` (a directory under prefnoise/), every prefnoise module it imports, anywhere."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "prefnoise" / package
    found = {}
    for path in sorted(root.glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
        found[path.name] = names
    return found


def test_the_training_layer_imports_no_command_and_options_no_torch():
    for module, names in imported_modules("training").items():
        above = {n for n in names if n.startswith(("prefnoise.reward", "prefnoise.policy", "prefnoise.cli",
                                                   "prefnoise.api"))}
        assert not above, (module, above)
    for module, names in imported_modules("options").items():
        heavy = {n for n in names if n.split(".")[0] in ("torch", "transformers", "accelerate", "polars")}
        assert not heavy and not {n for n in names if n.startswith(("prefnoise.cli", "prefnoise.training"))}, module
    for package in ("reward", "policy"):
        for module, names in imported_modules(package).items():
            assert not {n for n in names if n.startswith(("prefnoise.cli", "prefnoise.api"))}, (package, module)
    assert "prefnoise.reward.models" not in imported_modules("reward")["transformer.py"] or \
        "prefnoise.reward.transformer" not in imported_modules("reward")["models.py"]  # no models <-> external circle
