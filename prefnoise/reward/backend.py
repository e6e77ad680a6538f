"""Which reward-model backend a --model value names: mlp, embed+mlp, or a transformer directory."""

from __future__ import annotations

from pathlib import Path

from prefnoise.errors import PrefnoiseError


def backend_of(model: str | None, has_features: bool) -> tuple[str, str | None]:
    """(backend, model path) for the --model value: mlp, embed+mlp, or a local HF model directory."""
    if model is None:
        if not has_features:
            raise PrefnoiseError(
                "the table has no chosen_features/rejected_features, so there is no default model; "
                "pass --model PATH (a local HF model) or --model embed+mlp --encoder PATH"
            )
        return "mlp", None
    if model in ("mlp", "embed+mlp"):
        return model, None
    from prefnoise.reward.transformer import looks_like_hub_id, resolve_model  # heavy (torch): a model directory

    if not Path(model).exists() and looks_like_hub_id(model):  # a hub id: its snapshot in the local cache
        model = str(resolve_model(model, "--model"))
    if not Path(model).is_dir():
        raise PrefnoiseError(f"--model {model}: not 'mlp', 'embed+mlp' or a local model directory")
    return "transformer", model
