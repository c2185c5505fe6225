"""Hugging Face decoder checkpoints -> our `DecoderLM`: config, weight names, vocabulary resizing.

Shapes: D width, H heads, K head dim, V vocabulary rows.

A checkpoint directory holds config.json and weights in one of: model.safetensors,
sharded *.safetensors (+ model.safetensors.index.json), pytorch_model*.bin. Three model_types are
read: llama, mpt, gpt_neox. The name mapping is a declarative table per family (`_RULES`) used in
both directions — `hf_to_ours` for loading, `ours_to_hf` for export — and it also splits fused
projections: MPT's Wqkv is [q; k; v] stacked by rows, GPT-NeoX's query_key_value interleaves
[q_h; k_h; v_h] per head h.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from megaflamingo.config import LMConfig
from megaflamingo.models.decoder import DecoderLM, head_dim

# ----------------------------------------------------------------------------- config.json


def _llama_config(raw: dict) -> LMConfig:
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    return LMConfig(
        family="llama", vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"], num_heads=raw["num_attention_heads"],
        num_kv_heads=raw.get("num_key_value_heads"), head_dim=raw.get("head_dim"),
        intermediate_size=raw["intermediate_size"], norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_scaling=None if kind == "default" else rope,
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        attention_bias=raw.get("attention_bias", False), mlp_bias=raw.get("mlp_bias", False),
        hidden_act=raw.get("hidden_act", "silu"),
    )


# MPT options transformers' MptForCausalLM silently ignores (or that change the math we build):
# (attn_config key or top-level key, the only value we accept).
_MPT_FIXED = (("alibi", True), ("qk_ln", False), ("prefix_lm", False), ("softmax_scale", None),
              ("attn_type", "multihead_attention"), ("no_bias", True), ("logit_scale", None))


def _mpt_config(raw: dict) -> LMConfig:
    attn = raw.get("attn_config") or {}
    for key, value in _MPT_FIXED:
        got = attn.get(key, raw.get(key, value))
        if got != value:
            raise ValueError(f"MPT config {key}={got!r} is not supported (only {value!r})")
    return LMConfig(
        family="mpt", vocab_size=raw["vocab_size"], hidden_size=raw["d_model"],
        num_layers=raw["n_layers"], num_heads=raw["n_heads"],
        intermediate_size=raw.get("expansion_ratio", 4) * raw["d_model"],
        norm_eps=raw.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=True,
        max_position_embeddings=raw.get("max_seq_len", 2048),
        alibi_bias_max=attn.get("alibi_bias_max", 8), qkv_clip=attn.get("clip_qkv"),
        hidden_act="gelu",
    )


def _gpt_neox_config(raw: dict) -> LMConfig:
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", raw.get("rotary_emb_base", 10000.0))
    pct = rope.pop("partial_rotary_factor", raw.get("rotary_pct", 0.25))
    kind = rope.get("rope_type", rope.get("type", "default"))
    return LMConfig(
        family="gpt_neox", vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"], num_heads=raw["num_attention_heads"],
        intermediate_size=raw["intermediate_size"], norm_eps=raw.get("layer_norm_eps", 1e-5),
        rope_theta=float(theta), rope_scaling=None if kind == "default" else rope,
        rotary_pct=float(pct), use_parallel_residual=raw.get("use_parallel_residual", True),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        attention_bias=raw.get("attention_bias", True), mlp_bias=True,
        hidden_act=raw.get("hidden_act", "gelu"),
    )


_CONFIG_READERS = {"llama": _llama_config, "mpt": _mpt_config, "gpt_neox": _gpt_neox_config}


def lm_config_from_hf(path: str | Path) -> LMConfig:
    """Read a checkpoint's config.json into an `LMConfig` (with hf_path set).

    Handles both the transformers 5 `rope_parameters` form and the older top-level `rope_theta`
    / `rope_scaling` (LLaMA) and `rotary_pct` / `rotary_emb_base` (GPT-NeoX) keys. For MPT the
    MLP width is expansion_ratio * d_model here; `load_hf_lm` takes the width from the weights.

    Args:
        path: checkpoint directory.
    Returns:
        The LM config.
    Raises:
        FileNotFoundError: no config.json in `path`.
        ValueError: a model_type other than llama, mpt, gpt_neox, or an unsupported MPT option.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in LM checkpoint directory {path}")
    raw = json.loads(config_file.read_text())
    model_type = raw.get("model_type")
    if model_type not in _CONFIG_READERS:
        raise ValueError(f"unsupported LM model_type '{model_type}' in {config_file} "
                         f"(supported: {', '.join(_CONFIG_READERS)})")
    cfg = _CONFIG_READERS[model_type](raw)
    cfg.hf_path = str(path)
    return cfg


# ----------------------------------------------------------------------------- name mapping


@dataclass(frozen=True)
class _Rule:
    """One HF module <-> our module(s). `{i}` is the layer index; .weight/.bias carry over."""

    hf: str
    ours: tuple[str, ...]
    fuse: str = ""
    """"" one-to-one; "rows": HF = cat([q, k, v]); "heads": HF = per-head [q_h; k_h; v_h]."""


def _layer_rules(prefix: str, names: dict[str, str]) -> list[_Rule]:
    return [_Rule(f"{prefix}.{{i}}.{hf}", (f"layers.{{i}}.{ours}",)) for hf, ours in names.items()]


_QKV = ("layers.{i}.attn.q_proj", "layers.{i}.attn.k_proj", "layers.{i}.attn.v_proj")

_RULES: dict[str, list[_Rule]] = {
    "llama": [
        _Rule("model.embed_tokens", ("embed_tokens",)),
        _Rule("model.norm", ("norm",)),
        _Rule("lm_head", ("lm_head",)),
        *_layer_rules("model.layers", {
            "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
            "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
            "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.o_proj",
            "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
            "mlp.down_proj": "mlp.down_proj"}),
    ],
    "mpt": [
        _Rule("transformer.wte", ("embed_tokens",)),
        _Rule("transformer.norm_f", ("norm",)),
        _Rule("transformer.blocks.{i}.attn.Wqkv", _QKV, fuse="rows"),
        *_layer_rules("transformer.blocks", {
            "norm_1": "attn_norm", "norm_2": "mlp_norm", "attn.out_proj": "attn.o_proj",
            "ffn.up_proj": "mlp.up_proj", "ffn.down_proj": "mlp.down_proj"}),
    ],
    "gpt_neox": [
        _Rule("gpt_neox.embed_in", ("embed_tokens",)),
        _Rule("gpt_neox.final_layer_norm", ("norm",)),
        _Rule("embed_out", ("lm_head",)),
        _Rule("gpt_neox.layers.{i}.attention.query_key_value", _QKV, fuse="heads"),
        *_layer_rules("gpt_neox.layers", {
            "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
            "attention.dense": "attn.o_proj", "mlp.dense_h_to_4h": "mlp.up_proj",
            "mlp.dense_4h_to_h": "mlp.down_proj"}),
    ],
}

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


def _find_rule(module: str, family: str, side: str) -> tuple[_Rule, int, str | None] | None:
    """The rule naming `module` on `side` ("hf" or "ours"): (rule, which of its our-names, layer)."""
    for rule in _RULES[family]:
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
        if cfg.family == "gpt_neox" and name == "lm_head.weight":
            name = "embed_out.weight"  # transformers 5 calls GPT-NeoX's head lm_head in memory
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
    return state


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
    # transformers' MptMLP builds 4 * d_model whatever expansion_ratio says; MPT's own code uses
    # expansion_ratio. The weights are the truth either way.
    up = hf_state.get("transformer.blocks.0.ffn.up_proj.weight")
    if cfg.family == "mpt" and up is not None:
        cfg.intermediate_size = up.shape[0]


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
