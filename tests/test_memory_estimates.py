"""Memory estimated before allocating (issue 22): align's plan and a transformer's weights are checked
against what this process may allocate, and refused in one line with the estimate."""

from __future__ import annotations

import pytest
from tiny_models import pattern_pairs

from tests.cli_helpers import assert_nothing_written, assert_one_line_error, invoke

SMALL = ["--max-length", "32", "--max-prompt-length", "16", "--lr", "1e-3", "--device", "cpu", "--batch-size", "8"]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    pattern_pairs(32, seed=8).write_parquet(path)
    return path


def test_align_on_cpu_refuses_a_run_its_memory_estimate_says_cannot_fit(lm_path, data_path, tmp_path, monkeypatch):
    # 1 MB: the tiny model's weights (235 KB) load, its training plan (about 2.3 MB) does not
    monkeypatch.setattr("prefnoise.resources.available_memory", lambda: 1_000_000)
    out = tmp_path / "run"
    done = invoke("align", data_path, "--model", lm_path, "--out", out, "--max-steps", "1", *SMALL)
    line = assert_one_line_error(done, "needs about", "of memory to train, and 1.0 MB is available",
                                 "lower --batch-size or --max-length")
    assert "parameters" in line
    assert_nothing_written(out)


def test_a_transformer_whose_weights_cannot_fit_is_refused_before_loading(lm_path, data_path, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr("prefnoise.resources.available_memory", lambda: 1000)  # 1 KB left
    out = tmp_path / "rm"
    done = invoke("fit-reward", data_path, "--model", lm_path, "--out", out, "--epochs", "1", "--max-length", "32")
    line = assert_one_line_error(done, "parameters in float32) needs about", "of memory to load, and 1.0 KB is "
                                 "available", "use a smaller model")
    assert str(lm_path) in line
    assert_nothing_written(out)


def test_training_memory_by_hand():
    from prefnoise.resources import activation_bytes, training_memory_bytes

    # 1,000 tokens x 2 layers x width 32 x 20 activations x 4 bytes = 5,120,000; with checkpointing a tenth
    assert activation_bytes(1000, 2, 32, 4) == 5_120_000
    assert activation_bytes(1000, 2, 32, 4, checkpointing=True) == 512_000
    # bf16 activations halve it; 100 vocabulary logits add 1,000 x 100 x 8 = 800,000
    assert activation_bytes(1000, 2, 32, 2, vocab=100) == 2_560_000 + 800_000
    # full training: 4 + 12 bytes a parameter; LoRA: 4 a parameter, 12 more only for the 10 trained
    assert training_memory_bytes(1000, 1000) == 16_000
    assert training_memory_bytes(1000, 10) == 4000 + 120
    assert training_memory_bytes(1000, 10, 5, weight_copies=1) == 8000 + 120 + 5


def test_model_dims_read_gpt2_llama_and_t5_spellings():
    from types import SimpleNamespace

    from prefnoise.resources import model_dims

    assert model_dims(SimpleNamespace(n_embd=32, n_layer=2)) == (32, 2)
    assert model_dims(SimpleNamespace(hidden_size=64, num_hidden_layers=3)) == (64, 3)
    assert model_dims(SimpleNamespace(d_model=16, num_layers=4)) == (16, 4)
    assert model_dims(SimpleNamespace()) == (0, 0)


def test_align_plan_memory_is_the_shared_formula(lm_path):
    # the tiny GPT-2: the plan's estimate is training_memory_bytes of its counts and one micro-batch
    import numpy as np
    from transformers import AutoConfig

    from prefnoise.options.align import AlignConfig
    from prefnoise.policy.logprobs import TokenizedPairs, TokenizeSettings
    from prefnoise.policy.plan import make_plan
    from prefnoise.resources import activation_bytes, training_memory_bytes

    config = AutoConfig.from_pretrained(lm_path)
    pairs = TokenizedPairs([[1, 2]] * 4, [[3, 4, 5]] * 4, [[6]] * 4, [f"p{i}" for i in range(4)],
                           0, TokenizeSettings(32, 16, False, None))
    cfg = AlignConfig(model=str(lm_path), out="x", batch_size=2, device="cpu", precision="fp32")
    plan = make_plan(cfg, pairs, np.zeros(4, dtype=bool), config)
    tokens = 2 * 2 * 5  # both sides of 2 pairs, prompt 2 + longer response 3
    expected = training_memory_bytes(plan.parameters, plan.trainable_parameters,
                                     activation_bytes(tokens, 2, 32, 4, vocab=config.vocab_size))
    assert plan.memory_estimate_bytes == expected
    assert expected == 16 * plan.parameters + tokens * (2 * 32 * 80 + config.vocab_size * 8)


def test_fit_reward_refuses_a_transformer_whose_training_cannot_fit(lm_path, data_path, tmp_path, monkeypatch):
    # 1 MB: the tiny model's weights (about 190 KB) load; weights, gradients, Adam's moments and the
    # activations of 8 pairs of up to 32 tokens (about 2.6 MB) do not
    monkeypatch.setattr("prefnoise.resources.available_memory", lambda: 1_000_000)
    out = tmp_path / "rm"
    done = invoke("fit-reward", data_path, "--model", lm_path, "--out", out, "--epochs", "1", "--max-length", "32")
    line = assert_one_line_error(done, "needs about", "of memory to train", "lower --batch-size or --max-length")
    assert str(lm_path) in line and "trained, batches of" in line
    assert_nothing_written(out)


def test_fit_reward_lora_fits_where_full_training_does_not(lm_path, data_path, tmp_path, monkeypatch):
    # the same 1 MB that refuses full training: LoRA keeps gradients and moments of the adapters and head only
    monkeypatch.setattr("prefnoise.resources.available_memory", lambda: 1_000_000)
    done = invoke("fit-reward", data_path, "--model", lm_path, "--out", tmp_path / "rm", "--epochs", "1",
                  "--max-length", "32", "--lora-r", "2")
    assert done.exit_code == 0, done.output
    assert (tmp_path / "rm" / "reward_config.json").is_file()


def test_embed_mlp_refuses_an_encoder_batch_that_cannot_fit(data_path, tmp_path, monkeypatch):
    from tiny_models import make_tiny_encoder, pattern_texts

    encoder = make_tiny_encoder(tmp_path / "bert", pattern_texts())
    monkeypatch.setattr("prefnoise.resources.available_memory", lambda: 20_000)
    monkeypatch.setattr("prefnoise.hf.check_fits_in_memory", lambda *a, **k: None)  # the weights' own check
    out = tmp_path / "rm"
    done = invoke("fit-reward", data_path, "--model", "embed+mlp", "--encoder", encoder, "--out", out,
                  "--epochs", "1", "--max-length", "32", "--cache-dir", tmp_path / "cache", "--hidden", "4")
    assert_one_line_error(done, "the encoder", "tokens) needs about", "for its activations", "lower --max-length")
    assert_nothing_written(out)


def test_on_cuda_the_device_memory_is_what_is_available(monkeypatch):
    import torch

    from prefnoise.errors import PrefnoiseError
    from prefnoise.resources import check_fits_in_memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 80_000))  # 1 KB free on the device
    monkeypatch.setattr("prefnoise.resources.available_memory", lambda: 10**12)  # plenty on the CPU
    with pytest.raises(PrefnoiseError, match="needs about 1.5 KB of memory to train, and 1.0 KB is available"):
        check_fits_in_memory(1500, "x", "lower it", device=torch.device("cuda", 0))
    check_fits_in_memory(1500, "x", "lower it", device=torch.device("cuda", 0), held=600)  # weights already there
    check_fits_in_memory(1500, "x", "lower it", device=torch.device("cpu"))


def test_score_refuses_a_transformer_batch_that_cannot_fit(lm_path, data_path, tmp_path, monkeypatch):
    # the largest eval batch's activations are checked before the first pass; the weights have their own check
    model = tmp_path / "rm"
    fitted = invoke("fit-reward", data_path, "--model", lm_path, "--out", model, "--epochs", "1", "--max-length", "32",
                    "--lora-r", "2")
    assert fitted.exit_code == 0, fitted.output
    monkeypatch.setattr("prefnoise.resources.available_memory", lambda: 20_000)
    monkeypatch.setattr("prefnoise.hf.check_fits_in_memory", lambda *a, **k: None)
    out = tmp_path / "scored.parquet"
    done = invoke("score", model, data_path, out, "--device", "cpu")
    assert_one_line_error(done, "the reward model's largest scoring batch", "tokens) needs about",
                          "for its activations", "lower --batch-size or --max-length")
    assert_nothing_written(out)
    monkeypatch.setattr("prefnoise.resources.available_memory", lambda: 10**12)
    assert invoke("score", model, data_path, out, "--device", "cpu").exit_code == 0  # with room, it scores
