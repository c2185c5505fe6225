"""A model from a config as loaded: resolve it, build it, import an OpenFlamingo checkpoint.

    from megaflamingo.builder import build_model      # also `megaflamingo.build_model`
    model = build_model(load_config("configs/tiny.yaml").model)

`megaflamingo.models.flamingo.build_model` builds from a resolved config and reads no tokenizer;
this is the caller-side step around it for training, evaluation, benchmarks and tests. It sits
beside training (it imports `convert/`), so `models/` never imports `convert/`.
"""

from __future__ import annotations

from megaflamingo.config import ModelConfig
from megaflamingo.models import flamingo
from megaflamingo.resolve import resolve_model


def build_model(cfg: ModelConfig, resolved: bool = False) -> flamingo.Flamingo:
    """Build the Flamingo model a model config describes, with every weight it names loaded.

    Args:
        cfg: the model section of a config; resolved here unless `resolved` says it already is.
        resolved: True when `cfg` came from `resolve_model` / `resolve_config` (no second read
            of the tokenizer).
    Returns:
        The model in fp32 (random init where no weights are named), its trainable set fixed; the
        released-format checkpoint of `model.openflamingo_checkpoint` imported when set.
    Raises:
        ConfigError: the config cannot be resolved (see `resolve_model`).
        ValueError: a weight file or checkpoint does not match the config.
    """
    if not resolved:
        cfg = resolve_model(cfg)
    model = flamingo.build_model(cfg)
    if cfg.openflamingo_checkpoint is not None:
        from megaflamingo.convert.openflamingo import load_openflamingo_checkpoint

        load_openflamingo_checkpoint(model, cfg.openflamingo_checkpoint)
    return model
