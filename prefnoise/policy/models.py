"""The policy: the causal LM align trains, loaded from and saved to a local directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from prefnoise.atomic import atomic_path
from prefnoise.errors import PrefnoiseError
from prefnoise.hf import check_model_dir, check_weights, from_pretrained, quiet_transformers
from prefnoise.options.align import AlignConfig

ALIGN_COMMAND = "align"  # the marker in --out (prefnoise.outputs)


def check_causal_lm(model_path: str | Path):
    """The model's config after checking the path is a local causal-LM directory; else PrefnoiseError.

    Also checks the weights (present, readable, shaped as the config says) so that a damaged
    directory fails here, before ``train`` writes anything. No code from the directory runs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy: transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # heavy: transformers

    path = check_model_dir(model_path, "--model")
    config = from_pretrained(AutoConfig, path, what="--model")
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = list(getattr(config, "architectures", None) or [])
    ok = any(a in causal for a in architectures) if architectures else (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if not ok:
        found = ", ".join(architectures) or config.model_type
        raise PrefnoiseError(f"--model {model_path}: not a causal language model ({found}); "
                             "align needs a decoder such as GPT-2 or Llama")
    check_weights(AutoModelForCausalLM, path, "--model", config)
    return config


def load_tokenizer(model_path: str | Path):
    """The tokenizer saved beside the model; PrefnoiseError if there is none or it is damaged."""
    from transformers import AutoTokenizer  # heavy: transformers

    return from_pretrained(AutoTokenizer, model_path, what="--model")


def load_policy(cfg: AlignConfig, config) -> torch.nn.Module:
    """The causal LM to train, dropout off (as TRL does) and, with --lora-r, wrapped by peft."""
    from transformers import AutoModelForCausalLM  # heavy: transformers
    from transformers.utils import logging as hf_logging  # heavy: transformers

    # Dropout would make the policy differ from the reference at step 0 and add noise to z.
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    hf_logging.disable_progress_bar()
    model = from_pretrained(AutoModelForCausalLM, cfg.model, what="--model", config=config, dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r:
        from peft import LoraConfig, get_peft_model  # optional: LoRA runs only

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    return model


def count_parameters(config, lora_r: int) -> tuple[int, int]:
    """(all parameters, trainable parameters) of the model, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM  # heavy: transformers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    if not lora_r:
        return total, total
    from transformers.pytorch_utils import Conv1D  # heavy: transformers

    adapter = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | Conv1D) and "lm_head" not in name:
            rows, cols = module.weight.shape
            adapter += lora_r * (rows + cols)
    return total + adapter, adapter


def weights_digest(model: torch.nn.Module) -> str:
    """Hex digest of the trainable parameters (to check that data-parallel processes agree)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, param in model.named_parameters():
        if param.requires_grad:
            full = param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP: gathered
            digest.update(name.encode())
            digest.update(full.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def save_final_model(accelerator, model, tokenizer, dest: Path, cfg: AlignConfig, config) -> None:
    """save_pretrained into ``dest`` atomically: merged weights, or only the adapter (--save-adapter)."""
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model) if not cfg.lora_r else None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with atomic_path(dest, directory=True, command=ALIGN_COMMAND) as tmp:
            if cfg.lora_r and not cfg.save_adapter:
                unwrapped = unwrapped.merge_and_unload()
            restore_dropout(unwrapped, cfg.model)
            with quiet_transformers():
                unwrapped.save_pretrained(tmp, state_dict=state)
                tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()


def restore_dropout(model, model_path: str) -> None:
    """Put the original dropout settings back in the config that gets saved."""
    from transformers import AutoConfig  # heavy: transformers

    original = from_pretrained(AutoConfig, model_path, what="--model").to_dict()
    config = getattr(model, "config", None)
    if config is None or isinstance(config, dict):
        return
    for key, value in original.items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, value)
