"""`prefnoise fit-reward` and `prefnoise score` through the CLI, as a user runs them."""

from __future__ import annotations

import io
import json

import polars as pl
import pytest
from typer.testing import CliRunner

from prefnoise import columns as C
from prefnoise.cli import app
from prefnoise.data import read_history, write_table
from prefnoise.noise import NoiseSpec, corrupt_frame
from prefnoise.reward.synthetic import feature_pairs
from tests.conftest import make_pairs
from tests.tiny_models import make_tiny_causal_lm, make_tiny_encoder

runner = CliRunner()


@pytest.fixture(scope="module")
def noisy_path(tmp_path_factory):
    frame, _ = corrupt_frame(feature_pairs(1200, seed=3), NoiseSpec(kind="symmetric", rate=0.2, seed=3))
    path = tmp_path_factory.mktemp("data") / "noisy.parquet"
    write_table(frame, path, entry={"command": "corrupt", "parameters": {"rate": 0.2}})
    return path


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_fit_reward_writes_model_dir_and_prints_clean_accuracy_last(noisy_path, tmp_path):
    out = tmp_path / "rm"
    result = runner.invoke(
        app, ["fit-reward", str(noisy_path), "--loss", "sigmoid", "--out", str(out), "--epochs", "5", "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("val accuracy vs clean labels: ")
    clean_accuracy = float(lines[-1].rsplit(" ", 1)[1])
    assert clean_accuracy > 0.8
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "reward_config.json",
        "metrics.json",
        "metrics.jsonl",
        "history.json",
        ".prefnoise-output.json",  # the marker that lets a later --overwrite replace this directory
        "training_pairs.parquet",  # the pairs it trained and validated on: score keeps them apart
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 5 and metrics["loss"] == "sigmoid"
    assert metrics["final"]["val_clean_accuracy"] == pytest.approx(clean_accuracy, abs=5e-5)
    history = json.loads((out / "history.json").read_text())
    assert [h["command"] for h in history] == ["corrupt", "fit-reward"]
    assert history[-1]["parameters"]["loss"] == "sigmoid" and history[-1]["seed"] == 1
    config = json.loads((out / "reward_config.json").read_text())
    assert config["backend"] == "mlp" and config["output_clip"] == 20.0
    assert leftovers(tmp_path) == []


def test_fit_reward_json_and_loss_params(noisy_path, tmp_path):
    result = runner.invoke(
        app,
        [
            "fit-reward",
            str(noisy_path),
            "--loss",
            "rdpo",
            "--eps",
            "0.2",
            "--out",
            str(tmp_path / "rm"),
            "--epochs",
            "2",
            "--margin-scale",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["loss"] == "rdpo" and payload["loss_params"] == {"eps": 0.2}
    assert payload["margin_scale"] == 2.0 and payload["stopped_epoch"] == 2
    assert 0 <= payload["final"]["val_clean_accuracy"] <= 1


def test_score_adds_rewards_and_history(noisy_path, tmp_path):
    model = tmp_path / "rm"
    assert runner.invoke(app, ["fit-reward", str(noisy_path), "--out", str(model), "--epochs", "3"]).exit_code == 0
    out = tmp_path / "scored.parquet"
    result = runner.invoke(app, ["score", str(model), str(noisy_path), str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    scored = pl.read_parquet(out)
    assert scored.height == 1200 == summary["rows"]
    assert scored.schema[C.chosen(C.REWARD)] == pl.Float32 == scored.schema[C.rejected(C.REWARD)]
    margin = scored[C.chosen(C.REWARD)] - scored[C.rejected(C.REWARD)]
    assert summary["accuracy"] == pytest.approx(float((margin > 0).mean()))
    assert summary["clean_accuracy"] > 0.8  # the model ranks by the true reward, not the noisy labels
    assert [h["command"] for h in read_history(out)] == ["corrupt", "score"]

    # OUT may be '-': Parquet on stdout, the summary on stderr
    piped = runner.invoke(app, ["score", str(model), str(noisy_path), "-", "--json"])
    assert piped.exit_code == 0, piped.stderr
    from_stdout = pl.read_parquet(io.BytesIO(piped.stdout_bytes))
    assert from_stdout[C.chosen(C.REWARD)].to_list() == scored[C.chosen(C.REWARD)].to_list()
    assert json.loads(piped.stderr)["rows"] == 1200


def test_score_responses_mode(noisy_path, tmp_path):
    model = tmp_path / "rm"
    assert runner.invoke(app, ["fit-reward", str(noisy_path), "--out", str(model), "--epochs", "2"]).exit_code == 0
    pairs = pl.read_parquet(noisy_path).head(10)
    long = pl.DataFrame(
        {C.PROMPT: pairs[C.PROMPT], "response": pairs[C.CHOSEN], C.FEATURES: pairs[C.chosen(C.FEATURES)]}
    )
    long.write_parquet(tmp_path / "long.parquet")
    out = tmp_path / "long_scored.parquet"
    result = runner.invoke(app, ["score", str(model), str(tmp_path / "long.parquet"), str(out), "--responses"])
    assert result.exit_code == 0, result.output
    pair_scores = runner.invoke(app, ["score", str(model), str(noisy_path), "-"]).stdout_bytes
    expected = pl.read_parquet(io.BytesIO(pair_scores)).head(10)[C.chosen(C.REWARD)]
    got = pl.read_parquet(out)
    assert got.schema[C.REWARD] == pl.Float32
    assert got[C.REWARD].to_list() == pytest.approx(expected.to_list(), abs=1e-6)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--loss", "sigmod"], "unknown --loss 'sigmod'"),
        (["--loss", "sigmoid", "--eps", "0.1"], "--loss sigmoid does not use --eps"),
        (["--loss", "cdpo", "--eps", "0.7"], "eps must be in [0, 0.5)"),
        (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
        (["--model", "no/such/dir"], "not 'mlp', 'embed+mlp' or a local model directory"),
        (["--model", "embed+mlp"], "needs --encoder"),
        (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    ],
)
def test_fit_reward_bad_options_exit_2_and_leave_nothing(noisy_path, tmp_path, args, message):
    out = tmp_path / "rm"
    result = runner.invoke(app, ["fit-reward", str(noisy_path), "--out", str(out), "--epochs", "1", *args])
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists() and leftovers(tmp_path) == []


def test_fit_reward_bad_input(tmp_path):
    text_only = tmp_path / "text.parquet"
    make_pairs(10).write_parquet(text_only)
    for args, message in [
        ([str(tmp_path / "missing.parquet")], "no such file"),
        ([str(text_only)], "no chosen_features/rejected_features"),
    ]:
        result = runner.invoke(app, ["fit-reward", *args, "--out", str(tmp_path / "rm")])
        assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "rm").exists()


def test_score_bad_model_dir(noisy_path, tmp_path):
    (tmp_path / "dir").mkdir()
    result = runner.invoke(app, ["score", str(tmp_path / "dir"), str(noisy_path), str(tmp_path / "o.parquet")])
    assert result.exit_code == 2 and "not a prefnoise reward model" in result.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_failed_refit_keeps_the_previous_model(noisy_path, tmp_path, monkeypatch):
    out = tmp_path / "rm"
    assert runner.invoke(app, ["fit-reward", str(noisy_path), "--out", str(out), "--epochs", "1"]).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    from prefnoise.reward import models

    def fail(self, directory):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(models.MLPRewardModel, "save", fail)
    result = runner.invoke(app, ["fit-reward", str(noisy_path), "--out", str(out), "--epochs", "1"])
    assert result.exit_code != 0
    assert (out / "model.safetensors").read_bytes() == before
    assert leftovers(tmp_path) == []


def test_text_backends_through_the_cli(tmp_path):
    pairs = make_pairs(24)
    data = tmp_path / "pairs.parquet"
    pairs.write_parquet(data)
    corpus = pairs[C.PROMPT].to_list() + pairs[C.CHOSEN].to_list() + pairs[C.REJECTED].to_list()
    gpt2 = make_tiny_causal_lm(tmp_path / "gpt2", corpus)
    bert = make_tiny_encoder(tmp_path / "bert", corpus)
    for name, extra in [
        ("hf", ["--model", str(gpt2)]),
        ("emb", ["--model", "embed+mlp", "--encoder", str(bert), "--cache-dir", str(tmp_path / "cache")]),
    ]:
        out = tmp_path / f"rm-{name}"
        fit = runner.invoke(
            app,
            [
                "fit-reward",
                str(data),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--max-length",
                "24",
                "--val-fraction",
                "0.25",
                "--json",
                *extra,
            ],
        )
        assert fit.exit_code == 0, fit.output
        assert json.loads(fit.stdout)["backend"] == ("transformer" if name == "hf" else "embed+mlp")
        scored_path = tmp_path / f"scored-{name}.parquet"
        score = runner.invoke(
            app,
            [
                "score",
                str(out),
                str(data),
                str(scored_path),
                *(["--cache-dir", str(tmp_path / "cache")] if name == "emb" else []),
            ],
        )
        assert score.exit_code == 0, score.output
        scored = pl.read_parquet(scored_path)
        assert scored[C.chosen(C.REWARD)].null_count() == 0 and scored.height == 24
    assert (tmp_path / "rm-hf" / "tokenizer.json").is_file()
