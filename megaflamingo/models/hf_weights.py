"""Hugging Face decoder checkpoints -> our `DecoderLM`: config, weight names, vocabulary resizing.

Shapes: D width, H heads, K head dim, V vocabulary rows.

A checkpoint directory holds config.json and weights in one of: model.safetensors,
sharded *.safetensors (+ model.safetensors.index.json), pytorch_model*.bin. The model_types read,
their config.json readers and the weight-name rules are entries of the family table
(`models.families`); this module applies the rules in both directions — `hf_to_ours` for loading,
`ours_to_hf` for export — including fused projections: "rows" = [q; k; v] stacked by rows (MPT's
Wqkv), "heads" = [q_h; k_h; v_h] interleaved per head h (GPT-NeoX's query_key_value).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from megaflamingo.config import LMConfig
from megaflamingo.models.decoder import DecoderLM, head_dim
from megaflamingo.models.families import WeightRule, family_for_model_type, family_of

# ----------------------------------------------------------------------------- config.json


def lm_config_from_hf(path: str | Path) -> LMConfig:
    """Read a checkpoint's config.json into an `LMConfig` (with hf_path set).

    The family entry whose `model_types` holds config.json's model_type reads it (both the
    transformers 5 `rope_parameters` form and the older top-level keys). Where the family names
    `hf_mlp_width_key` (MPT), `load_hf_lm` takes the MLP width from the weights instead.

    Args:
        path: checkpoint directory.
    Returns:
        The LM config.
    Raises:
        FileNotFoundError: no config.json in `path`.
        ValueError: a model_type no family entry reads, or an option the family cannot build.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in LM checkpoint directory {path}")
    from megaflamingo.models.mosaicgpt import as_hf_mpt_config  # MPT-1B's MosaicGPT layout (H5)

    raw = as_hf_mpt_config(json.loads(config_file.read_text()))
    cfg = family_for_model_type(raw.get("model_type"), str(config_file)).read_hf_config(raw)
    cfg.hf_path = str(path)
    return cfg


# ----------------------------------------------------------------------------- name mapping

# Checkpoint entries that are not weights of the model (old buffers, tied duplicates).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + r"$")


def _split(tensor: torch.Tensor, fuse: str, num_heads: int) -> list[torch.Tensor]:
    if fuse == "rows":
        return list(tensor.chunk(3, dim=0))
    per_head = tensor.unflatten(0, (num_heads, 3, -1))  # (H, 3, K, ...)
    return [per_head[:, j].flatten(0, 1) for j in range(3)]


def _fuse(parts: Sequence[torch.Tensor], fuse: str) -> torch.Tensor:
    if fuse == "rows":
        return torch.cat(list(parts), dim=0)
    return torch.stack(list(parts), dim=1).flatten(0, 2)  # (H, 3, K, ...) -> (H*3*K, ...)


def _per_head(parts: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    return [p.unflatten(0, (-1, k)) for p in parts]  # each (H, K, ...)


def _is_ignored(name: str, cfg: LMConfig) -> bool:
    # A tied checkpoint may still carry a head copy (some exporters write it); the embedding wins,
    # as in transformers.
    return bool(_IGNORED.search(name)) or (cfg.tie_word_embeddings and name == "lm_head.weight")


def _find_rule(module: str, family: str, side: str) -> tuple[WeightRule, int, str | None] | None:
    """The rule naming `module` on `side` ("hf" or "ours"): (rule, which of its our-names, layer)."""
    for rule in family_of(family).weight_rules:
        names = (rule.hf,) if side == "hf" else rule.ours
        for position, template in enumerate(names):
            found = _pattern(template).match(module)
            if found:
                return rule, position, found.group(1) if found.groups() else None
    return None


def hf_to_ours(hf_state: Mapping[str, torch.Tensor], cfg: LMConfig) -> dict[str, torch.Tensor]:
    """Rename (and split fused q/k/v of) a Hugging Face state dict into our names.

    Args:
        hf_state: checkpoint tensors by HF name (LlamaForCausalLM / MptForCausalLM /
            GPTNeoXForCausalLM layout; GPT-NeoX's head may be `embed_out` or `lm_head`).
        cfg: the LM config (family, heads).
    Returns:
        Tensors by our `DecoderLM` names, `embed_tokens.weight` being the full (V, D) table.
    Raises:
        ValueError: a checkpoint key no rule maps (naming it).
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        name = family_of(cfg).hf_aliases.get(name, name)
        if _is_ignored(name, cfg):
            continue
        module, param = name.rsplit(".", 1)
        found = _find_rule(module, cfg.family, "hf")
        if found is None:
            raise ValueError(f"unexpected key '{name}' in the {cfg.family} checkpoint")
        rule, _, layer = found
        parts = _split(tensor, rule.fuse, cfg.num_heads) if rule.fuse else [tensor]
        for ours, part in zip(rule.ours, parts):
            out[f"{ours.format(i=layer)}.{param}"] = part.contiguous()
    return out


def ours_to_hf(state: Mapping[str, torch.Tensor], cfg: LMConfig) -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_ours`: our names (and separate q/k/v) back to the HF layout.

    Args:
        state: `DecoderLM.merged_state_dict()` (merged `embed_tokens.weight`, no `added`).
        cfg: the LM config.
    Returns:
        Tensors by HF name, loadable by the family's transformers class (GPT-NeoX head as
        `embed_out.weight`, as transformers 5 writes it).
    Raises:
        ValueError: a key no rule maps, or a q/k/v projection without its two partners.
    """
    if "embed_tokens.added" in state:
        raise ValueError("pass DecoderLM.merged_state_dict(): 'embed_tokens.added' must be merged")
    out: dict[str, torch.Tensor] = {}
    for name in state:
        module, param = name.rsplit(".", 1)
        found = _find_rule(module, cfg.family, "ours")
        if found is None:
            raise ValueError(f"key '{name}' has no Hugging Face {cfg.family} name")
        rule, _, layer = found
        hf_name = f"{rule.hf.format(i=layer)}.{param}"
        if hf_name in out:
            continue  # a fused tensor already built from its q/k/v parts
        if not rule.fuse:
            out[hf_name] = state[name]
            continue
        part_names = [f"{ours.format(i=layer)}.{param}" for ours in rule.ours]
        missing = [p for p in part_names if p not in state]
        if missing:
            raise ValueError(f"cannot fuse {hf_name}: missing {', '.join(missing)}")
        parts = [state[p] for p in part_names]
        if rule.fuse == "heads":
            parts = _per_head(parts, head_dim(cfg))
        out[hf_name] = _fuse(parts, rule.fuse).contiguous()
    return out


# ----------------------------------------------------------------------------- files


def _weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred over .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / s for s in shards]
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin",
                    "pytorch_model*.bin"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"no model.safetensors, *.safetensors or pytorch_model*.bin in {path}")


def read_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory by HF name, on the CPU.

    Raises:
        FileNotFoundError: no weight file (or a shard named by the index is absent).
    """
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path)):
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint shard {file} is missing")
        if file.suffix == ".safetensors":
            state.update(load_file(str(file), device="cpu"))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    from megaflamingo.models.mosaicgpt import as_hf_mpt_state  # MPT-1B's MosaicGPT names (H5)

    return as_hf_mpt_state(state)


# ----------------------------------------------------------------------------- vocabulary


def resize_rows(weight: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Cut a (V, D) table to its first `num_rows` rows, or grow it with rows set to the mean row.

    Args:
        weight: (V, D).
        num_rows: V' (any size >= 1).
    Returns:
        (V', D); the shared min(V, V') rows are exactly those of `weight`.
    """
    if num_rows <= weight.shape[0]:
        return weight[:num_rows].clone()
    mean_row = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean_row.expand(num_rows - weight.shape[0], -1)], dim=0)


def _adopt_checkpoint_mlp_width(cfg: LMConfig, hf_state: Mapping[str, torch.Tensor]) -> None:
    # The family names a weight whose rows are the true MLP width (MPT: see models.families).
    key = family_of(cfg).hf_mlp_width_key
    if key is not None and key in hf_state:
        cfg.intermediate_size = hf_state[key].shape[0]


def _hf_name(keys: Sequence[str], tensors: Mapping[str, torch.Tensor], cfg: LMConfig) -> str:
    """The checkpoint's name for the first of `keys` (our names), for error messages."""
    try:
        return next(iter(ours_to_hf({k: tensors[k] for k in keys}, cfg)))
    except (ValueError, StopIteration):
        return keys[0]


def _check_keys(ours: Mapping[str, torch.Tensor], model: DecoderLM) -> None:
    expected = model.merged_state_dict()
    missing = [k for k in expected if k not in ours]
    unexpected = [k for k in ours if k not in expected]
    if missing or unexpected:
        problem = (f"missing key '{_hf_name(missing, expected, model.cfg)}'" if missing
                   else f"unexpected key '{_hf_name(unexpected, ours, model.cfg)}'")
        raise ValueError(f"{model.cfg.family} checkpoint does not fit the model: {problem} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, tensor in expected.items():
        if key not in ("embed_tokens.weight", "lm_head.weight") and tensor.shape != ours[key].shape:
            raise ValueError(f"checkpoint tensor for '{key}' has shape {tuple(ours[key].shape)}, "
                             f"the model expects {tuple(tensor.shape)}")


def load_hf_lm(path: str | Path, vocab_size: int | None = None,
               trainable_ids: Sequence[int] = ()) -> DecoderLM:
    """Build a `DecoderLM` from a local Hugging Face checkpoint directory and load its weights.

    Args:
        path: directory with config.json and model.safetensors / sharded safetensors (+ index) /
            pytorch_model*.bin.
        vocab_size: rows of the embedding and (untied) head; None keeps the checkpoint's. Fewer
            rows cut the table; more rows are added, each set to the mean of the existing rows.
        trainable_ids: ids whose rows live in the embedding's trainable table.
    Returns:
        The decoder in fp32 on the CPU, in eval mode.
    Raises:
        FileNotFoundError: no config.json or weights.
        ValueError: unsupported model_type or option; a missing, unexpected or misshaped key.
    """
    cfg = lm_config_from_hf(path)
    hf_state = read_hf_state_dict(path)
    _adopt_checkpoint_mlp_width(cfg, hf_state)
    ours = hf_to_ours(hf_state, cfg)
    if "embed_tokens.weight" in ours:
        cfg.vocab_size = ours["embed_tokens.weight"].shape[0]
    rows = vocab_size or cfg.vocab_size
    model = DecoderLM(cfg, rows, trainable_ids)
    for key in ("embed_tokens.weight", "lm_head.weight"):
        if key in ours:
            ours[key] = resize_rows(ours[key], rows)
    _check_keys(ours, model)
    with torch.no_grad():
        model.embed_tokens.load_merged_weight(ours.pop("embed_tokens.weight"))
        model.load_state_dict(ours, strict=False)  # completeness was checked by _check_keys
    return model.eval()
