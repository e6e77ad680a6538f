"""Load a reward model from a directory: one fit-reward wrote, or a sequence-classification checkpoint."""

from __future__ import annotations

from pathlib import Path

from prefnoise.errors import PrefnoiseError
from prefnoise.hf import first_line
from prefnoise.reward.embed import EmbedMLPRewardModel, Encoder, embed_feature_dim
from prefnoise.reward.models import (
    CONFIG_FILE,
    ENCODER_DIR,
    HEAD_FILE,
    SAVED_AS,
    WEIGHTS_FILE,
    MLPRewardModel,
    RewardModel,
    _load_weights,
    read_reward_config,
)
from prefnoise.reward.networks import FeatureMLP, PooledReward, SequenceReward
from prefnoise.reward.tokens import load_tokenizer
from prefnoise.reward.transformer import (
    TransformerRewardModel,
    _hf_reward_module,
    is_external,
    load_external_reward_model,
)


def load_reward_model(directory: str | Path, *, cache_dir: str | Path | None = None) -> RewardModel:
    """The reward model saved by ``fit-reward`` in ``directory`` (on CPU, eval mode).

    A missing, incomplete or damaged directory (reward_config.json, weights, encoder copy, tokenizer)
    raises a one-line PrefnoiseError naming it; no code from the directory is ever run. A plain
    sequence-classification checkpoint (num_labels=1, e.g. TRL's) or a cached hub id loads through
    :mod:`prefnoise.reward.transformer`.
    """
    if is_external(directory):
        return load_external_reward_model(directory)
    directory = Path(directory)
    config = read_reward_config(directory)
    backend = config["backend"]
    if backend in ("mlp", "embed+mlp"):
        try:
            module = FeatureMLP(
                config["input_dim"], config["hidden"], config["layers"], config["dropout"], config["output_clip"]
            )
        except (ValueError, RuntimeError, TypeError) as error:
            raise PrefnoiseError(f"{directory / CONFIG_FILE}: unusable MLP settings ({first_line(error)})") from None
        _load_weights(module, directory / WEIGHTS_FILE, directory)
        if backend == "mlp":
            model: RewardModel = MLPRewardModel(module, config)
        else:
            encoder = Encoder(
                directory / ENCODER_DIR,
                max_length=config["max_length"],
                cache_dir=cache_dir,
                what=f"{SAVED_AS} encoder",
            ).load()  # its cache entries are trusted by the recorded fingerprint: the copy itself is checked here
            width = embed_feature_dim(config["embed_features"], encoder.dim)
            if width != config["input_dim"]:
                raise PrefnoiseError(
                    f"{SAVED_AS} {directory}: the encoder copy and embed_features {','.join(config['embed_features'])} "
                    f"make {width} dims but {CONFIG_FILE} says input_dim {config['input_dim']}; "
                    "train the model again with `prefnoise fit-reward`"
                )
            # the copy has the original's weights, so it shares the original's cache entries
            encoder._fingerprint = config["encoder_fingerprint"]
            model = EmbedMLPRewardModel(module, config, encoder)
    else:  # "transformer" (read_reward_config accepts no other backend)
        tokenizer = load_tokenizer(directory, SAVED_AS)
        module, _ = _hf_reward_module(directory, config["head"], SAVED_AS, config["output_clip"])
        if isinstance(module, SequenceReward) and module.model.config.pad_token_id is None:
            module.model.config.pad_token_id = tokenizer.pad_token_id
        if isinstance(module, PooledReward):
            _load_weights(module.head, directory / HEAD_FILE, directory)
        model = TransformerRewardModel(module, config, tokenizer)
    model.module.eval()
    return model
