"""OpenFlamingo checkpoints in and out.

A released OpenFlamingo `checkpoint.pt` (reference §3) is a flat state dict of the trainable
modules under OpenFlamingo's names (a `module.` prefix from DDP is tolerated):

    perceiver.latents, perceiver.norm.*
    perceiver.layers.<i>.0.{norm_media,norm_latents,to_q,to_kv,to_out}.*      (attention)
    perceiver.layers.<i>.1.{0,1,3}.*                                       (LayerNorm, Linear, Linear)
    lang_encoder.<layers>.<i>.gated_cross_attn_layer.{attn_gate,ff_gate,attn.*,ff.{0,1,3}.*}
    lang_encoder.<input embedding>.weight                                  (V, D), all rows
    [lang_encoder.lm_head.weight | lang_encoder.embed_out.weight]          (output head, some LMs)

where <layers> is `transformer.blocks` (MPT), `model.layers` (LLaMA) or `gpt_neox.layers`
(GPT-NeoX). Frozen LM and vision weights that an unfiltered checkpoint may also carry are not
read: they come from their own sources. Import maps these names onto our modules; export writes
our trainable state back in the same layout (the added token rows merged into the one matrix).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from megaflamingo.models.families import FAMILIES, family_of
from megaflamingo.models.flamingo import Flamingo

LAYERS_ATTR = {name: f.hf_layers for name, f in FAMILIES.items()}
INPUT_EMBEDDING = {name: f"{f.hf_module('embed_tokens')}.weight" for name, f in FAMILIES.items()}
OUTPUT_HEAD_KEYS = ("lang_encoder.lm_head.weight", "lang_encoder.embed_out.weight")

# Our name <-> OpenFlamingo's name, below `perceiver.layers.<i>.` and `...gated_cross_attn_layer.`.
_PERCEIVER_LAYER = {"attn.": "0.", "ff.norm.": "1.0.", "ff.up.": "1.1.", "ff.down.": "1.3."}
_XATTN = {"attn_gate": "attn_gate", "ff_gate": "ff_gate", "norm.": "attn.norm.", "to_q.": "attn.to_q.",
          "to_kv.": "attn.to_kv.", "to_out.": "attn.to_out.", "ff.norm.": "ff.0.", "ff.up.": "ff.1.",
          "ff.down.": "ff.3."}


class CheckpointError(ValueError):
    """An OpenFlamingo checkpoint does not fit the model (names the offending key)."""


def _rename(name: str, table: dict[str, str]) -> str:
    for ours, theirs in table.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise KeyError(name)


def _family(model: Flamingo) -> str:
    return model.lm.cfg.family


def openflamingo_names(model: Flamingo) -> dict[str, str]:
    """Map each trainable parameter name of ours (except the embedding) to OpenFlamingo's name."""
    layers = LAYERS_ATTR[_family(model)]
    names = {}
    for name, _ in model.perceiver.named_parameters():
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        theirs = f"layers.{m[1]}.{_rename(m[2], _PERCEIVER_LAYER)}" if m else name
        names[f"perceiver.{name}"] = f"perceiver.{theirs}"
    for name, _ in model.xattn.named_parameters():
        i, rest = name.split(".", 1)
        names[f"xattn.{name}"] = f"lang_encoder.{layers}.{i}.gated_cross_attn_layer.{_rename(rest, _XATTN)}"
    return names


def export_openflamingo_state_dict(model: Flamingo) -> dict[str, torch.Tensor]:
    """Our trainable state in OpenFlamingo's released `checkpoint.pt` layout (fp32, CPU)."""
    params = dict(model.named_parameters())
    out = {theirs: params[ours].detach().float().cpu().clone()
           for ours, theirs in openflamingo_names(model).items()}
    family = _family(model)
    emb = model.lm.embed_tokens.merged_weight().float().cpu()
    out[f"lang_encoder.{INPUT_EMBEDDING[family]}"] = emb
    spec = family_of(family)
    if model.lm.lm_head is None and spec.openflamingo_tied_head_alias:
        out["lang_encoder.lm_head.weight"] = emb  # tied HF LMs keep the alias (reference §3)
    if spec.openflamingo_writes_head:
        head = f"lang_encoder.{spec.hf_module('lm_head')}.weight"
        out[head] = model.lm.lm_head.weight.detach().float().cpu().clone()
    return out


def _strip_prefix(state: dict) -> dict:
    state = state.get("model_state_dict", state)
    return {k.removeprefix("module."): v for k, v in state.items()}


def _is_frozen_source_key(key: str, family: str) -> bool:
    """Keys an unfiltered checkpoint may carry that come from the CLIP / LM sources instead."""
    if key.startswith("vision_encoder."):
        return True
    if not key.startswith("lang_encoder."):
        return False
    return "gated_cross_attn_layer" not in key and key != f"lang_encoder.{INPUT_EMBEDDING[family]}"


def _copy(target: torch.Tensor, value: torch.Tensor, key: str) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise CheckpointError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value)


def import_openflamingo_state_dict(model: Flamingo, state: dict[str, torch.Tensor]) -> list[str]:
    """Load an OpenFlamingo state dict into `model` in place.

    Args:
        model: a built Flamingo whose LM family and sizes match the checkpoint.
        state: the checkpoint's state dict (`module.` prefixes and a `model_state_dict` wrapper ok).
    Returns:
        The checkpoint keys that were not read because they come from the frozen sources.
    Raises:
        CheckpointError: a required key is missing, an unknown key is present, or a shape differs.
    """
    state = _strip_prefix(state)
    family = _family(model)
    params = dict(model.named_parameters())
    wanted = {theirs: ours for ours, theirs in openflamingo_names(model).items()}
    emb_key = f"lang_encoder.{INPUT_EMBEDDING[family]}"
    for theirs, ours in wanted.items():
        if theirs not in state:
            raise CheckpointError(f"missing key in checkpoint: {theirs}")
        _copy(params[ours], state[theirs], theirs)
    if emb_key not in state:
        raise CheckpointError(f"missing key in checkpoint: {emb_key}")
    emb = model.lm.embed_tokens
    if tuple(state[emb_key].shape) != (emb.num_embeddings, emb.dim):
        raise CheckpointError(f"{emb_key}: checkpoint shape {tuple(state[emb_key].shape)} != "
                              f"model shape {(emb.num_embeddings, emb.dim)}")
    emb.load_merged_weight(state[emb_key])
    for key in OUTPUT_HEAD_KEYS:
        if key in state and model.lm.lm_head is not None:
            _copy(model.lm.lm_head.weight, state[key], key)
    ignored = []
    for key in state:
        if key in wanted or key == emb_key or key in OUTPUT_HEAD_KEYS:
            continue
        if key.startswith("lang_encoder.gated_cross_attn_layers.") or _is_frozen_source_key(key, family):
            ignored.append(key)  # aliases of the xattn blocks, or frozen weights from the sources
            continue
        raise CheckpointError(f"unexpected key in checkpoint: {key}")
    return ignored


def load_openflamingo_checkpoint(model: Flamingo, path: str | Path) -> list[str]:
    """Read a `checkpoint.pt` (weights_only) and import it; see `import_openflamingo_state_dict`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"OpenFlamingo checkpoint not found: {path}")
    return import_openflamingo_state_dict(model, torch.load(path, map_location="cpu", weights_only=True))


def save_openflamingo_checkpoint(model: Flamingo, path: str | Path) -> None:
    """Write our trainable state as an OpenFlamingo `checkpoint.pt`."""
    torch.save(export_openflamingo_state_dict(model), Path(path))
