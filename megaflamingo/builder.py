"""A model from a config as loaded: resolve it, build it, import an OpenFlamingo checkpoint.

    from megaflamingo.builder import build_model      # also `megaflamingo.build_model`
    model = build_model(load_config("configs/tiny.yaml").model)
    model = build_training_model(cfg, groups)          # one training rank's share (launcher/pretrain.py)

`megaflamingo.models.flamingo.build_model` builds from a resolved config and reads no tokenizer;
this is the caller-side step around it for training, evaluation, benchmarks and tests. It sits
beside training (it imports `convert/`), so `models/` never imports `convert/`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megaflamingo.config import Config, ConfigError, ModelConfig
from megaflamingo.models import flamingo
from megaflamingo.resolve import resolve_model

if TYPE_CHECKING:
    from megaflamingo.parallel.topology import ProcessGroups


def build_model(cfg: ModelConfig, resolved: bool = False, seed: int | None = None) -> flamingo.Flamingo:
    """Build the Flamingo model a model config describes, with every weight it names loaded.

    Args:
        cfg: the model section of a config; resolved here unless `resolved` says it already is.
        resolved: True when `cfg` came from `resolve_model` / `resolve_config` (no second read
            of the tokenizer).
        seed: the initialisation seed (`models.flamingo.build_model`; None: drawn from torch's
            global generator). Training on any layout with train.seed = s starts from the model
            of seed s.
    Returns:
        The model (random init by (seed, name) where no weights are named), its trainable set fixed; the
        released-format checkpoint of `model.openflamingo_checkpoint` imported when set.
    Raises:
        ConfigError: the config cannot be resolved (see `resolve_model`).
        ValueError: a weight file or checkpoint does not match the config.
    """
    if not resolved:
        cfg = resolve_model(cfg)
    model = flamingo.build_model(cfg, seed)
    if cfg.openflamingo_checkpoint is not None:
        from megaflamingo.convert.openflamingo import load_openflamingo_checkpoint

        load_openflamingo_checkpoint(model, cfg.openflamingo_checkpoint)
    return model


def build_training_model(cfg: Config, groups: ProcessGroups) -> flamingo.Flamingo:
    """This rank's model for training (`training.engine.build_rank_local_model`: its stage, its TP
    slices), with the OpenFlamingo checkpoint of `model.openflamingo_checkpoint` imported.

    Args:
        cfg: the resolved run config.
        groups: this rank's `ProcessGroups`.
    Returns:
        The rank-local model.
    Raises:
        ConfigError: an OpenFlamingo checkpoint with tp or pp > 1 (its import needs the whole model).
    """
    from megaflamingo.training.engine import build_rank_local_model

    path = cfg.model.openflamingo_checkpoint
    if path is not None and (groups.dims.tp > 1 or groups.dims.pp > 1):
        raise ConfigError(f"model.openflamingo_checkpoint: importing {path} into a tp={groups.dims.tp} "
                          f"pp={groups.dims.pp} rank-local build is not supported; train from it with tp=pp=1")
    model = build_rank_local_model(cfg, groups)
    if path is not None:
        from megaflamingo.convert.openflamingo import load_openflamingo_checkpoint

        load_openflamingo_checkpoint(model, path)
    return model
