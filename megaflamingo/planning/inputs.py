"""What a plan reads: the run config without its weight files, the layout's world, a meta-device model.

A plan is made before the cluster is rented, so nothing here reads a weight file. The LM's sizes
come from `model.lm.hf_path`'s config.json (the directory may hold nothing else), the vision
tower's from its open_clip config; absent weight files, tokenizer or data shards are left out
with a note. The model is then built on the meta device: real module classes and parameter
shapes, no storage.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Sequence

import torch
import yaml

from megaflamingo.config import Config, ConfigError, config_from_dict
from megaflamingo.config import _apply_override as apply_override  # the loader's own key=value rule

ADDED_TOKENS = 3
"""Rows OpenFlamingo adds to the tokenizer when it has no pad token: <|endofchunk|>, <image>, <PAD>."""


def _absent(path: str | None) -> bool:
    return path is not None and not Path(path).exists()


def _drop_absent_files(raw: dict, notes: list[str]) -> None:
    """Remove weight/tokenizer/shard paths that do not exist here (a plan never reads them)."""
    model = raw.setdefault("model", {}) or {}
    vision = model.get("vision") or {}
    if _absent(vision.get("weights")):
        notes.append(f"vision weights {vision.pop('weights')} absent: not needed for a plan")
    for key in ("tokenizer", "openflamingo_checkpoint"):
        if _absent(model.get(key)):
            notes.append(f"model.{key} {model.pop(key)} absent")
    lm = model.get("lm") or {}
    if lm.get("hf_path") is not None and not (Path(lm["hf_path"]) / "config.json").is_file():
        raise ConfigError(f"model.lm.hf_path: no config.json in {lm['hf_path']} "
                          f"(a plan reads only the LM's config.json, no weights)")
    for stream in (raw.get("data") or {}).values():
        if isinstance(stream, dict) and stream.get("shards") is not None:
            stream["shards"] = str(stream["shards"])  # kept: a stream is on when it has shards


def _fill_vocab(raw: dict, notes: list[str]) -> None:
    """A checkpoint LM without its tokenizer: config.json's vocabulary + 3 added rows and their ids."""
    model = raw["model"]
    lm = model.get("lm") or {}
    if model.get("tokenizer") is not None or model.get("vocab_size") is not None or lm.get("hf_path") is None:
        return  # an inline LM without a tokenizer keeps its own rows and ids, as in training
    from megaflamingo.models.hf_weights import lm_config_from_hf

    base = lm_config_from_hf(lm["hf_path"]).vocab_size
    ids = dict(vocab_size=base + ADDED_TOKENS, eoc_token_id=base, media_token_id=base + 1, pad_token_id=base + 2)
    for key, value in ids.items():
        model.setdefault(key, value)
    notes.append(f"vocabulary rows {base + ADDED_TOKENS} = the LM's {base} + {ADDED_TOKENS} added tokens "
                 f"(no tokenizer; set model.vocab_size=N for the exact count)")


def load_plan_config(path: str, overrides: Sequence[str] = ()) -> tuple[Config, list[str]]:
    """The run config for planning: validated like `load_config`, absent weight files left out.

    Args:
        path: YAML run config.
        overrides: dotted `key=value` overrides, applied before anything is left out.
    Returns:
        (config, notes): notes say in words what was left out or assumed.
    Raises:
        ConfigError: a missing or invalid config, a bad override, an LM directory without config.json.
    """
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item)
    notes: list[str] = []
    _drop_absent_files(raw, notes)
    _fill_vocab(raw, notes)
    return config_from_dict(raw), notes


def world_from_hostfile(path: str) -> tuple[int, list[str]]:
    """(world size, host of each rank) from a DeepSpeed hostfile ("<host> slots=<n>" per line).

    Raises:
        ConfigError: a missing file, a malformed line, or no slots at all.
    """
    if not Path(path).is_file():
        raise ConfigError(f"hostfile not found: {path}")
    hosts: list[str] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if match is None:
            raise ConfigError(f"{path}:{number}: expected '<host> slots=<n>', got '{line}'")
        hosts += [match.group(1)] * int(match.group(2))
    if not hosts:
        raise ConfigError(f"{path}: no slots")
    return len(hosts), hosts


def meta_model(cfg: Config) -> torch.nn.Module:
    """The Flamingo of `cfg` on the meta device: every parameter's shape, no storage, no file read.

    Args:
        cfg: a config from `load_plan_config` (vocabulary rows and token ids known).
    Returns:
        The model; its parameters are meta tensors with the trainable set fixed as in training.
    """
    from megaflamingo.models.flamingo import build_model
    from megaflamingo.models.flops import lm_shape

    m = cfg.model
    plain = dataclasses.replace(
        m, lm=dataclasses.replace(lm_shape(m), hf_path=None), tokenizer=None, openflamingo_checkpoint=None,
        vision=dataclasses.replace(m.vision, weights=None),
    )
    with torch.device("meta"):
        return build_model(plain)
