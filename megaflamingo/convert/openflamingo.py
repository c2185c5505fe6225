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

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from megaflamingo.config import ModelConfig, PerceiverConfig, VisionConfig, XAttnConfig
from megaflamingo.models.families import FAMILIES, family_of
from megaflamingo.models.flamingo import Flamingo, xattn_layer_indices

LAYERS_ATTR = {name: f.hf_layers for name, f in FAMILIES.items()}
INPUT_EMBEDDING = {name: f"{f.hf_module('embed_tokens')}.weight" for name, f in FAMILIES.items()}
OUTPUT_HEAD_KEYS = ("lang_encoder.lm_head.weight", "lang_encoder.embed_out.weight")

# Our name <-> OpenFlamingo's name, below `perceiver.layers.<i>.` and `...gated_cross_attn_layer.`.
_PERCEIVER_LAYER = {"attn.": "0.", "ff.norm.": "1.0.", "ff.up.": "1.1.", "ff.down.": "1.3."}
_XATTN = {"attn_gate": "attn_gate", "ff_gate": "ff_gate", "norm.": "attn.norm.", "to_q.": "attn.to_q.",
          "to_kv.": "attn.to_kv.", "to_out.": "attn.to_out.", "ff.norm.": "ff.0.", "ff.up.": "ff.1.",
          "ff.down.": "ff.3."}


_XATTN_KEY = re.compile(r"^lang_encoder\.(.+)\.(\d+)\.gated_cross_attn_layer\.")
OPENFLAMINGO_DIM_HEAD = 64
"""OpenFlamingo builds its Perceiver and cross-attention heads 64 wide (reference §2.3, §2.4)."""


class CheckpointError(ValueError):
    """An OpenFlamingo checkpoint does not fit the model (names the offending key)."""


# ----------------------------------------------------------------------------- what a checkpoint says


def checkpoint_layers_attr(state: dict[str, torch.Tensor]) -> str:
    """The decoder-layers attribute a checkpoint's LM has (`transformer.blocks` for MPT, ...).

    Raises:
        CheckpointError: no `lang_encoder.<layers>.<i>.gated_cross_attn_layer.*` key, or an
            attribute no LM family has.
    """
    attrs = {m[1] for k in state if (m := _XATTN_KEY.match(k))}
    if not attrs:
        raise CheckpointError("checkpoint has no lang_encoder.<layers>.<i>.gated_cross_attn_layer.* key "
                              "(not an OpenFlamingo checkpoint?)")
    if len(attrs) != 1 or next(iter(attrs)) not in LAYERS_ATTR.values():
        raise CheckpointError(f"checkpoint decoder layers under lang_encoder.{sorted(attrs)[0]}.* are not one of "
                              f"{', '.join(sorted(set(LAYERS_ATTR.values())))}")
    return next(iter(attrs))


def check_family(state: dict[str, torch.Tensor], family: str, where: str) -> None:
    """Raise a one-line CheckpointError when the checkpoint's LM is not of `family` (`where` names the LM)."""
    attr = checkpoint_layers_attr(state)
    if attr != LAYERS_ATTR[family]:
        theirs = "/".join(sorted(f for f, a in LAYERS_ATTR.items() if a == attr))
        raise CheckpointError(f"checkpoint is for a {theirs} LM (keys lang_encoder.{attr}.*), {where} is {family}")


def checkpoint_xattn_layers(state: dict[str, torch.Tensor]) -> list[int]:
    """Decoder layer indices that have a cross-attention block in the checkpoint."""
    return sorted({int(m[2]) for k in state if (m := _XATTN_KEY.match(k))})


def infer_every_n(state: dict[str, torch.Tensor], num_layers: int) -> int:
    """cross_attn_every_n_layers of a checkpoint for a `num_layers`-layer LM.

    Raises:
        CheckpointError: the cross-attention layers fit no n (e.g. a checkpoint for a deeper LM).
    """
    found = checkpoint_xattn_layers(_strip_prefix(state))
    n = found[0] + 1 if found else 0
    if not found:
        raise CheckpointError("checkpoint has no lang_encoder.<layers>.<i>.gated_cross_attn_layer.* key")
    if found != xattn_layer_indices(num_layers, n):
        raise CheckpointError(f"checkpoint has cross-attention before decoder layers {found} "
                              f"(cross_attn_every_n_layers={n}), which does not fit a {num_layers}-layer LM "
                              f"(n={n} would put it before {xattn_layer_indices(num_layers, n)})")
    return n


def _check_fits(model: Flamingo, state: dict[str, torch.Tensor]) -> None:
    """One-line errors for the two common mismatches: another LM family, another n."""
    check_family(state, _family(model), "the model's LM")
    found, mine = checkpoint_xattn_layers(state), sorted(int(i) for i in model.xattn)
    if found != mine:
        try:
            hint = f"set model.cross_attn_every_n_layers={infer_every_n(state, len(model.lm.layers))}"
        except CheckpointError as err:
            hint = str(err)
        raise CheckpointError(f"checkpoint has cross-attention before decoder layers {found}, the model before "
                              f"{mine} (cross_attn_every_n_layers={mine[0] + 1 if mine else '?'}): {hint}")


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
        CheckpointError: another LM family or cross_attn_every_n_layers (naming the right n), a
            required key is missing, an unknown key is present, or a shape differs.
    """
    state = _strip_prefix(state)
    _check_fits(model, state)
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
    return import_openflamingo_state_dict(model, read_openflamingo_checkpoint(path))


def read_openflamingo_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a `checkpoint.pt` (weights_only; `module.` prefixes stripped).

    Raises:
        CheckpointError: the file is missing, truncated or not a state dict (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"OpenFlamingo checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated / corrupt files raise several types
        raise CheckpointError(f"cannot read OpenFlamingo checkpoint {path}: {type(err).__name__}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return _strip_prefix(state)


def save_openflamingo_checkpoint(model: Flamingo, path: str | Path) -> None:
    """Write our trainable state as an OpenFlamingo `checkpoint.pt`."""
    torch.save(export_openflamingo_state_dict(model), Path(path))


# ----------------------------------------------------------------------------- one call


@dataclass
class OpenFlamingoReport:
    """What `from_openflamingo` read and did not read."""

    cross_attn_every_n_layers: int
    """n, inferred from the checkpoint's keys."""
    ignored: list[str]
    """Checkpoint keys not read (frozen vision / LM weights, alias keys): they come from the sources."""
    from_sources: list[str]
    """Model parameters the checkpoint does not hold, loaded from the LM dir / vision weights."""
    model_config: ModelConfig
    """The resolved model config the model was built from."""


def _vision_config(vision) -> VisionConfig:
    """A VisionConfig from an open_clip model name, a config dict / YAML / JSON file, or itself."""
    if isinstance(vision, VisionConfig):
        return vision
    if isinstance(vision, (str, Path)) and Path(vision).suffix in (".yaml", ".yml", ".json"):
        import yaml

        vision = yaml.safe_load(Path(vision).read_text())
    if isinstance(vision, str):
        return VisionConfig(open_clip_model=vision)
    if isinstance(vision, dict):
        fields = {f.name for f in dataclasses.fields(VisionConfig)}
        return VisionConfig(**vision) if set(vision) <= fields else VisionConfig(open_clip_config=vision)
    raise TypeError(f"vision must be an open_clip model name, a config dict / file or a VisionConfig, got {vision!r}")


def _resampler_sizes(state: dict[str, torch.Tensor]) -> tuple[PerceiverConfig, XAttnConfig]:
    """Perceiver and cross-attention sizes from the checkpoint's tensor shapes (heads 64 wide)."""
    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"missing key in checkpoint: {key}")
        return state[key]

    latents = need("perceiver.latents")
    depth = len({int(m[1]) for k in state if (m := re.match(r"^perceiver\.layers\.(\d+)\.", k))})
    inner = need("perceiver.layers.0.0.to_q.weight").shape[0]
    ff = need("perceiver.layers.0.1.1.weight").shape[0] // latents.shape[1]
    perceiver = PerceiverConfig(depth=depth, heads=inner // OPENFLAMINGO_DIM_HEAD, dim_head=OPENFLAMINGO_DIM_HEAD,
                                num_latents=latents.shape[0], ff_mult=ff)
    prefix = next(k for k in state if _XATTN_KEY.match(k)).split("gated_cross_attn_layer.")[0]
    to_q = need(prefix + "gated_cross_attn_layer.attn.to_q.weight")
    ff_up = need(prefix + "gated_cross_attn_layer.ff.1.weight")
    xattn = XAttnConfig(heads=to_q.shape[0] // OPENFLAMINGO_DIM_HEAD, dim_head=OPENFLAMINGO_DIM_HEAD,
                        ff_mult=ff_up.shape[0] // to_q.shape[1])
    return perceiver, xattn


def from_openflamingo(checkpoint: str | Path, lm: str | Path, vision, tokenizer: str | Path) -> Flamingo:
    """A released OpenFlamingo model in one call: n and the module sizes come from the checkpoint.

    Args:
        checkpoint: the released `checkpoint.pt`.
        lm: the LM's Hugging Face directory (MPT, RedPajama / GPT-NeoX, LLaMA; MosaicGPT converted).
        vision: an open_clip model name ("ViT-L-14"), an inline open_clip config dict, a
            VisionConfig (e.g. with `weights=` the local CLIP file) or a YAML / JSON file of one.
        tokenizer: the tokenizer directory (the Flamingo tokens are added as OpenFlamingo does).
    Returns:
        The model in eval mode; `model.openflamingo_report` (`OpenFlamingoReport`) says which n was
        inferred, which checkpoint keys were not read and which weights came from the sources.
    Raises:
        CheckpointError: the checkpoint does not fit the LM (family, depth, shapes), one line.
        ConfigError: the LM, vision tower or tokenizer cannot be used.
    """
    from megaflamingo.models.flamingo import build_model
    from megaflamingo.resolve import resolve_model

    state = read_openflamingo_checkpoint(checkpoint)
    perceiver, xattn = _resampler_sizes(state)
    cfg = resolve_model(ModelConfig(vision=_vision_config(vision), lm=dataclasses.replace(ModelConfig().lm, hf_path=str(lm)),
                                    tokenizer=str(tokenizer), perceiver=perceiver, xattn=xattn))
    check_family(state, cfg.lm.family, f"the LM at {lm}")
    cfg = dataclasses.replace(cfg, cross_attn_every_n_layers=infer_every_n(state, cfg.lm.num_layers))
    model = build_model(cfg).eval()
    ignored = import_openflamingo_state_dict(model, state)
    covered = set(openflamingo_names(model)) | {"lm.embed_tokens.weight", "lm.embed_tokens.added"}
    if any(k in state for k in OUTPUT_HEAD_KEYS) and model.lm.lm_head is not None:
        covered.add("lm.lm_head.weight")
    model.openflamingo_report = OpenFlamingoReport(
        cfg.cross_attn_every_n_layers, ignored, [n for n, _ in model.named_parameters() if n not in covered], cfg)
    return model
