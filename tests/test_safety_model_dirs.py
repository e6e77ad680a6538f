"""Model directories are data, never code: custom code is refused, damaged directories give one line.

Every case runs the CLI as a user would, with "y" lines on stdin (the answer transformers' "run the
custom code? [y/N]" prompt would read), and checks: exit code 2, exactly one "Error: ..." line on
stderr naming the directory, no traceback, no code from the directory ran, no output written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from prefnoise import hf
from prefnoise.cli import app
from prefnoise.errors import PrefnoiseError
from prefnoise.reward.networks import FeatureMLP
from prefnoise.reward.synthetic import feature_pairs
from tests.conftest import make_pairs
from tests.tiny_models import make_tiny_causal_lm, make_tiny_encoder, pattern_pairs, pattern_texts

PACKAGE = Path(__file__).resolve().parents[1] / "prefnoise"
YES = "y\ny\ny\n"
SMALL_ALIGN = ["--max-length", "32", "--max-prompt-length", "16", "--device", "cpu", "--max-steps", "1"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "vocab.txt", "chat_template.jinja")

EVIL_CODE = """\
import pathlib
pathlib.Path({marker!r}).write_text("code from the model directory ran")
from transformers import {config_cls} as _Config, {model_cls} as _Model, PreTrainedTokenizerFast


class EvilConfig(_Config):
    model_type = {model_type!r}


class EvilModel(_Model):
    config_class = EvilConfig


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def invoke(args, stdin: str = YES):
    return CliRunner().invoke(app, [str(a) for a in args], input=stdin)


def assert_one_line_error(result, directory: Path, *phrases: str) -> str:
    """Exit 2, one "Error:" line on stderr naming ``directory`` and each phrase, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    stderr = result.stderr
    assert stderr.startswith("Error: ") and stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    assert str(directory) in stderr, stderr
    for phrase in phrases:
        assert phrase in stderr, (phrase, stderr)
    return stderr


def copy_dir(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def plant_evil_code(directory: Path, marker: Path, *, config_cls: str, model_cls: str, model_type: str,
                    in_tokenizer_only: bool = False) -> None:
    """Make ``directory`` ask for its own code (auto_map) and put that code, which leaves ``marker``, beside it.

    Without prefnoise's guard, transformers (trust_remote_code unset) asks "run the custom code? [y/N]"
    and a "y" on stdin runs evil.py. With ``in_tokenizer_only`` config.json has no auto_map but a
    model_type transformers does not know, which is what makes AutoTokenizer ask.
    """
    (directory / "evil.py").write_text(EVIL_CODE.format(marker=str(marker), config_cls=config_cls,
                                                        model_cls=model_cls, model_type=model_type))
    if in_tokenizer_only:
        edit_json(directory / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
                  auto_map={"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]})
        edit_json(directory / "config.json", model_type=model_type)
        return
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                "AutoModelForCausalLM": "evil.EvilModel", "AutoModelForSequenceClassification": "evil.EvilModel"}
    edit_json(directory / "config.json", model_type=model_type, architectures=["EvilModel"], auto_map=auto_map)


# --- fixtures: tiny models and reward dirs, built once --------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Tiny models, data files and two reward dirs (mlp, transformer), shared read-only by the module."""
    root = tmp_path_factory.mktemp("safety")
    texts = pattern_texts()
    gpt2 = make_tiny_causal_lm(root / "gpt2", texts)
    gpt2_wide = make_tiny_causal_lm(root / "gpt2-wide", texts, n_embd=48)  # same vocab, other widths
    bert = make_tiny_encoder(root / "bert", texts)
    text_data = root / "text.parquet"
    make_pairs(16).write_parquet(text_data)
    make_pairs(16).write_csv(root / "text.csv")
    align_data = root / "align.parquet"
    pattern_pairs(16, seed=1).write_parquet(align_data)
    feature_data = root / "features.parquet"
    feature_pairs(256, dim=8, seed=0).write_parquet(feature_data)
    mlp_rm = root / "rm-mlp"
    fit = invoke(["fit-reward", feature_data, "--out", mlp_rm, "--epochs", "1", "--hidden", "16", "--device", "cpu"])
    assert fit.exit_code == 0, fit.output
    hf_rm = root / "rm-hf"
    fit = invoke(["fit-reward", text_data, "--model", gpt2, "--out", hf_rm, "--epochs", "1", "--max-length", "24",
                  "--device", "cpu"])
    assert fit.exit_code == 0, fit.output
    return {"gpt2": gpt2, "gpt2_wide": gpt2_wide, "bert": bert, "text_data": text_data,
            "align_data": align_data, "feature_data": feature_data, "mlp_rm": mlp_rm, "hf_rm": hf_rm}


def test_intact_copies_work(built, tmp_path):
    """The baseline the damage cases start from: copies of the tiny dirs load and run."""
    for rm, data in [(built["mlp_rm"], built["feature_data"]), (built["hf_rm"], built["text_data"])]:
        out = tmp_path / f"scored-{rm.name}.parquet"
        result = invoke(["score", copy_dir(rm, tmp_path / rm.name), data, out])
        assert result.exit_code == 0, result.output
        assert pl.read_parquet(out)["chosen_reward"].null_count() == 0
    plan = invoke(["align", built["align_data"], "--model", copy_dir(built["gpt2"], tmp_path / "lm"), "--dry-run",
                   "--json", *SMALL_ALIGN])
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.stdout)["rows"] == 16


# --- custom code is never run ---------------------------------------------------------------------------


def _evil_commands(built, model: Path, encoder: Path, reward_dir: Path, out: Path) -> dict[str, tuple[list, str]]:
    piped = "y\n" + built["text_data"].with_suffix(".csv").read_text() + "y\ny\n"
    return {
        "fit-reward --model": (["fit-reward", built["text_data"], "--model", model, "--out", out, "--epochs", "1"],
                               YES),
        "fit-reward --encoder": (["fit-reward", built["text_data"], "--model", "embed+mlp", "--encoder", encoder,
                                  "--out", out, "--epochs", "1", "--cache-dir", out.parent / "cache"], YES),
        "align --model": (["align", built["align_data"], "--model", model, "--out", out, *SMALL_ALIGN], YES),
        "score (data piped on stdin)": (["score", reward_dir, "-", out], piped),
    }


@pytest.mark.parametrize("in_tokenizer_only", [False, True], ids=["config.json", "tokenizer_config.json"])
def test_custom_code_is_refused_and_never_runs(built, tmp_path, in_tokenizer_only):
    marker = tmp_path / "evil-code-ran"
    model = copy_dir(built["gpt2"], tmp_path / "evil-gpt2")
    encoder = copy_dir(built["bert"], tmp_path / "evil-bert")
    reward_dir = copy_dir(built["hf_rm"], tmp_path / "evil-rm")
    plant_evil_code(model, marker, config_cls="GPT2Config", model_cls="GPT2LMHeadModel", model_type="evilgpt2",
                    in_tokenizer_only=in_tokenizer_only)
    plant_evil_code(encoder, marker, config_cls="BertConfig", model_cls="BertModel", model_type="evilbert",
                    in_tokenizer_only=in_tokenizer_only)
    plant_evil_code(reward_dir, marker, config_cls="GPT2Config", model_cls="GPT2ForSequenceClassification",
                    model_type="evilgpt2", in_tokenizer_only=in_tokenizer_only)
    where = "tokenizer_config.json" if in_tokenizer_only else "config.json"
    targets = {"fit-reward --model": model, "fit-reward --encoder": encoder, "align --model": model,
               "score (data piped on stdin)": reward_dir}
    out = tmp_path / "out"
    for name, (args, stdin) in _evil_commands(built, model, encoder, reward_dir, out).items():
        result = invoke(args, stdin)
        stderr = assert_one_line_error(result, targets[name], "contains custom code", f"auto_map in {where}",
                                       "prefnoise does not run model code")
        assert not marker.exists(), name
        assert not out.exists(), name
        assert "[y/N]" not in result.output, (name, stderr)


def test_unknown_architecture_without_auto_map_is_refused(built, tmp_path):
    model = copy_dir(built["gpt2"], tmp_path / "custom-arch")
    edit_json(model / "config.json", architectures=["MyOwnGPT2LMHeadModel"])
    out = tmp_path / "out"
    result = invoke(["align", built["align_data"], "--model", model, "--out", out, *SMALL_ALIGN])
    assert_one_line_error(result, model, "'MyOwnGPT2LMHeadModel'", "not built into transformers")
    assert not out.exists()


# --- damaged HF model directories -----------------------------------------------------------------------


def _truncate(path: Path, size: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


def _remove_tokenizer(directory: Path) -> None:
    for name in TOKENIZER_FILES:
        (directory / name).unlink(missing_ok=True)


HF_DAMAGE = {
    "config.json missing": (lambda d, b: (d / "config.json").unlink(), "no config.json"),
    "config.json not JSON": (lambda d, b: (d / "config.json").write_text("{'model_type': 'gpt2'"),
                             "config.json is not readable JSON"),
    "config.json not an object": (lambda d, b: (d / "config.json").write_text("[1, 2]"),
                                  "config.json is not a JSON object"),
    "unknown model_type": (lambda d, b: edit_json(d / "config.json", model_type="nonexistent"),
                           "model_type 'nonexistent'"),
    "weights deleted": (lambda d, b: (d / "model.safetensors").unlink(), "no model weights"),
    "weights truncated to 10 bytes": (lambda d, b: _truncate(d / "model.safetensors", 10),
                                      "model.safetensors is damaged or truncated"),
    "weights cut in half": (lambda d, b: _truncate(d / "model.safetensors"),
                            "model.safetensors is damaged or truncated"),
    "weights of another width": (lambda d, b: shutil.copy(b["gpt2_wide"] / "model.safetensors", d),
                                 "weights do not match config.json"),
    "no tokenizer files": (lambda d, b: _remove_tokenizer(d), "no tokenizer files"),
    "tokenizer.json corrupt": (lambda d, b: (d / "tokenizer.json").write_text('{"version": "1.0", "model": '),
                               "tokenizer.json is not valid JSON"),
    "tokenizer.json deleted": (lambda d, b: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
}


@pytest.mark.parametrize("damage", list(HF_DAMAGE))
def test_damaged_model_dir_for_fit_reward_and_align(built, tmp_path, damage):
    spoil, phrase = HF_DAMAGE[damage]
    model = copy_dir(built["gpt2"], tmp_path / "gpt2")
    spoil(model, built)
    for args in (["fit-reward", built["text_data"], "--model", model, "--epochs", "1", "--max-length", "24"],
                 ["align", built["align_data"], "--model", model, *SMALL_ALIGN]):
        out = tmp_path / "out"
        stderr = assert_one_line_error(invoke([*args, "--out", out]), model, phrase)
        assert not out.exists(), args[0]
        assert "empty after truncation" not in stderr


@pytest.mark.parametrize("damage", ["weights truncated to 10 bytes", "unknown model_type", "no tokenizer files"])
def test_damaged_encoder_dir(built, tmp_path, damage):
    spoil, phrase = HF_DAMAGE[damage]
    encoder = copy_dir(built["bert"], tmp_path / "bert")
    spoil(encoder, built)
    out = tmp_path / "out"
    result = invoke(["fit-reward", built["text_data"], "--model", "embed+mlp", "--encoder", encoder, "--out", out,
                     "--epochs", "1", "--cache-dir", tmp_path / "cache"])
    assert_one_line_error(result, encoder, "--encoder", phrase)
    assert not out.exists()


# --- damaged reward model directories (score) -------------------------------------------------------------


def _other_width_mlp(directory: Path, built) -> None:
    save_file(FeatureMLP(8, hidden=4).state_dict(), str(directory / "model.safetensors"))


MLP_RM_DAMAGE = {
    "reward_config.json not JSON": (lambda d, b: (d / "reward_config.json").write_text("{backend: mlp}"),
                                    "reward_config.json: not readable JSON"),
    "reward_config.json missing a key": (lambda d, b: edit_json(d / "reward_config.json", hidden=None),
                                         "needs 'hidden', which is missing"),
    "reward_config.json wrong type": (lambda d, b: edit_json(d / "reward_config.json", input_dim="eight"),
                                      "input_dim is 'eight', not an integer >= 1"),
    "unknown backend": (lambda d, b: edit_json(d / "reward_config.json", backend="svm"), "unknown backend 'svm'"),
    "weights deleted": (lambda d, b: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    "weights truncated to 10 bytes": (lambda d, b: _truncate(d / "model.safetensors", 10),
                                      "model.safetensors is damaged or truncated"),
    "weights of another width": (_other_width_mlp, "net.0.weight of shape [4, 8]"),
}

HF_RM_DAMAGE = {
    "reward_config.json unknown head": (lambda d, b: edit_json(d / "reward_config.json", head="attention"),
                                        "head is 'attention'"),
    "reward_config.json missing max_length": (lambda d, b: edit_json(d / "reward_config.json", max_length=None),
                                              "needs 'max_length'"),
    **{name: HF_DAMAGE[name] for name in ("config.json not JSON", "unknown model_type", "weights deleted",
                                          "weights truncated to 10 bytes", "weights cut in half",
                                          "no tokenizer files", "tokenizer.json corrupt")},
    "weights of another width": (lambda d, b: shutil.copy(b["gpt2_wide"] / "model.safetensors", d),
                                 "weights do not match config.json"),
}


@pytest.mark.parametrize(
    "backend,damage",
    [("mlp", name) for name in MLP_RM_DAMAGE] + [("transformer", name) for name in HF_RM_DAMAGE],
)
def test_damaged_reward_dir_for_score(built, tmp_path, backend, damage):
    source, data, table = {
        "mlp": (built["mlp_rm"], built["feature_data"], MLP_RM_DAMAGE),
        "transformer": (built["hf_rm"], built["text_data"], HF_RM_DAMAGE),
    }[backend]
    spoil, phrase = table[damage]
    reward_dir = copy_dir(source, tmp_path / "rm")
    spoil(reward_dir, built)
    out = tmp_path / "scored.parquet"
    assert_one_line_error(invoke(["score", reward_dir, data, out]), reward_dir, phrase)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]


def test_damaged_encoder_copy_in_an_embed_mlp_reward_dir(built, tmp_path):
    reward_dir, cache = tmp_path / "rm", tmp_path / "cache"
    fit = invoke(["fit-reward", built["text_data"], "--model", "embed+mlp", "--encoder", built["bert"], "--out",
                  reward_dir, "--epochs", "1", "--hidden", "8", "--max-length", "24", "--cache-dir", cache])
    assert fit.exit_code == 0, fit.output
    out = tmp_path / "scored.parquet"
    _truncate(reward_dir / "encoder" / "model.safetensors", 10)
    result = invoke(["score", reward_dir, built["text_data"], out, "--cache-dir", cache])
    assert_one_line_error(result, reward_dir / "encoder", "reward model encoder",
                          "model.safetensors is damaged or truncated")
    shutil.rmtree(reward_dir / "encoder")
    result = invoke(["score", reward_dir, built["text_data"], out, "--cache-dir", cache])
    assert_one_line_error(result, reward_dir / "encoder", "does not exist")
    assert not out.exists()


def test_pooled_head_missing_or_misshapen(built, tmp_path):
    from prefnoise.reward import save_reward_model
    from prefnoise.reward.fitting import FitResult
    from prefnoise.reward.transformer import new_transformer

    pooled = tmp_path / "pooled"
    model = new_transformer(built["bert"], max_length=24, head="pooled")
    model.config.update(loss="sigmoid")
    save_reward_model(FitResult(model, {}), pooled, history=[])
    out = tmp_path / "scored.parquet"
    assert invoke(["score", pooled, built["text_data"], out]).exit_code == 0
    out.unlink()
    save_file({"weight": torch.zeros(1, 7), "bias": torch.zeros(1)}, str(pooled / "head.safetensors"))
    assert_one_line_error(invoke(["score", pooled, built["text_data"], out]), pooled,
                          "head.safetensors has weight of shape [1, 7]")
    (pooled / "head.safetensors").unlink()
    assert_one_line_error(invoke(["score", pooled, built["text_data"], out]), pooled, "head.safetensors is missing")
    assert not out.exists()


# --- every load goes through prefnoise.hf ---------------------------------------------------------------


def test_every_from_pretrained_in_the_package_goes_through_the_helper():
    direct = re.compile(r"\.\s*from_pretrained\s*\(|[\"']from_pretrained[\"']")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "hf.py" and path.parent == PACKAGE:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if direct.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert offenders == [], "load through prefnoise.hf.from_pretrained instead:\n" + "\n".join(offenders)
    # hf.py itself makes exactly one such call, and it pins trust_remote_code=False
    source = (PACKAGE / "hf.py").read_text(encoding="utf-8")
    assert len(direct.findall(source)) == 1
    assert "trust_remote_code=False" in source


def test_helper_pins_trust_remote_code_false(built, monkeypatch):
    from transformers import AutoConfig

    seen = {}
    original = AutoConfig.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        return original(path, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", spy)
    config = hf.from_pretrained(AutoConfig, built["gpt2"], what="--model")
    assert config.model_type == "gpt2"
    assert seen["trust_remote_code"] is False and seen["local_files_only"] is True
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        hf.from_pretrained(AutoConfig, built["gpt2"], what="--model", trust_remote_code=True)


def test_models_prefer_safetensors(built, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = copy_dir(built["gpt2"], tmp_path / "both")
    state = load_file(model / "model.safetensors")
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, model / "pytorch_model.bin")
    loaded = hf.from_pretrained(AutoModelForCausalLM, model, what="--model")
    weights = loaded.state_dict()["transformer.wte.weight"]
    assert torch.equal(weights, state["transformer.wte.weight"]) and weights.abs().sum() > 0


def test_check_model_dir_messages(tmp_path):
    with pytest.raises(PrefnoiseError, match="does not exist"):
        hf.check_model_dir(tmp_path / "nope", "--model")
    (tmp_path / "f").write_text("x")
    with pytest.raises(PrefnoiseError, match="not a directory"):
        hf.check_model_dir(tmp_path / "f", "--model")
    with pytest.raises(PrefnoiseError, match=r"--encoder .*no config\.json"):
        hf.check_model_dir(tmp_path, "--encoder")


def test_other_config_files_are_scanned_but_need_not_be_objects(tmp_path):
    """sentence-transformers ship data_config.json as a JSON list: a real model dir must still load."""
    from prefnoise.hf import check_model_dir

    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    (tmp_path / "data_config.json").write_text('[{"name": "s2orc"}]')
    (tmp_path / "sentence_bert_config.json").write_text("not json at all")
    assert check_model_dir(tmp_path, "--encoder") == tmp_path
    (tmp_path / "config_sentence_transformers.json").write_text('{"auto_map": {"AutoModel": "evil.Model"}}')
    with pytest.raises(PrefnoiseError, match=r"custom code \(auto_map in config_sentence_transformers.json\)"):
        check_model_dir(tmp_path, "--encoder")
    (tmp_path / "config_sentence_transformers.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(PrefnoiseError, match="tokenizer_config.json is not a JSON object"):
        check_model_dir(tmp_path, "--encoder")
