"""MosaicGPT (MPT-1B-redpajama, the OpenFlamingo-3B LM) -> the Hugging Face MPT layout, on load.

`mosaicml/mpt-1b-redpajama-200b` (and OpenFlamingo's copy `anas-awadalla/mpt-1b-redpajama-200b`)
ships MosaicML's early remote code (`mosaic_gpt.py`, model_type "mosaic_gpt", MosaicML examples
v0.0.4) instead of the later MPT code transformers' `MptForCausalLM` follows. Same architecture
(ALiBi, bias-free LayerNorms, GELU MLP, tied head), other names:

| MosaicGPT (config.json)              | HF MPT                                   |
|--------------------------------------|------------------------------------------|
| d_model, n_heads, n_layers           | same                                     |
| mlp_ratio                            | expansion_ratio                          |
| alibi, alibi_bias_max                | attn_config.alibi, .alibi_bias_max       |
| attn_clip_qkv, attn_qk_ln            | attn_config.clip_qkv, .qk_ln             |
| softmax_scale, prefix_lm             | attn_config.softmax_scale, .prefix_lm    |
| no_bias, logit_scale                 | same                                     |

| MosaicGPT (weights)                       | HF MPT                                    |
|-------------------------------------------|-------------------------------------------|
| transformer.wte                           | transformer.wte                           |
| transformer.blocks.<i>.ln_1 / ln_2        | transformer.blocks.<i>.norm_1 / norm_2    |
| transformer.blocks.<i>.attn.Wqkv          | transformer.blocks.<i>.attn.Wqkv          |
| transformer.blocks.<i>.attn.out_proj      | transformer.blocks.<i>.attn.out_proj      |
| transformer.blocks.<i>.attn.q_ln / k_ln   | transformer.blocks.<i>.attn.q_ln / k_ln   |
| transformer.blocks.<i>.mlp.mlp_up / mlp_down | transformer.blocks.<i>.ffn.up_proj / down_proj |
| transformer.ln_f                          | transformer.norm_f                        |

The MPT reader then validates the converted config as for any MPT checkpoint: options the model
cannot compute (QK LayerNorm among them; the MPT-1B model card says it uses it) are a one-line
error naming the option, never silently dropped.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

MODEL_TYPE = "mosaic_gpt"
_ATTN_KEYS = {"alibi": "alibi", "alibi_bias_max": "alibi_bias_max", "attn_clip_qkv": "clip_qkv",
              "attn_qk_ln": "qk_ln", "softmax_scale": "softmax_scale", "prefix_lm": "prefix_lm",
              "attn_impl": "attn_impl", "attn_pdrop": "attn_pdrop", "attn_uses_sequence_id": "attn_uses_sequence_id"}
_TOP_KEYS = ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size", "no_bias", "logit_scale",
             "embedding_fraction", "resid_pdrop", "emb_pdrop", "init_device", "bos_token_id", "eos_token_id",
             "pad_token_id", "tie_word_embeddings", "use_cache")
_RENAMES = (  # (MosaicGPT pattern, HF MPT replacement)
    (r"^transformer\.blocks\.(\d+)\.ln_1\.", r"transformer.blocks.\1.norm_1."),
    (r"^transformer\.blocks\.(\d+)\.ln_2\.", r"transformer.blocks.\1.norm_2."),
    (r"^transformer\.blocks\.(\d+)\.mlp\.mlp_up\.", r"transformer.blocks.\1.ffn.up_proj."),
    (r"^transformer\.blocks\.(\d+)\.mlp\.mlp_down\.", r"transformer.blocks.\1.ffn.down_proj."),
    (r"^transformer\.blocks\.(\d+)\.attn\.(Wqkv|out_proj|q_ln|k_ln)\.", r"transformer.blocks.\1.attn.\2."),
    (r"^transformer\.ln_f\.", "transformer.norm_f."),
    (r"^transformer\.wte\.", "transformer.wte."),
)


def is_mosaicgpt(raw_config: Mapping) -> bool:
    """Whether a config.json (parsed) is MosaicGPT's."""
    return raw_config.get("model_type") == MODEL_TYPE


def mpt_config(raw: Mapping) -> dict:
    """A MosaicGPT config.json (parsed) as the HF MPT config it describes.

    Raises:
        ValueError: a required size is missing (naming it).
    """
    for key in ("d_model", "n_heads", "n_layers", "vocab_size"):
        if key not in raw:
            raise ValueError(f"MosaicGPT config.json lacks '{key}'")
    out = {key: raw[key] for key in _TOP_KEYS if key in raw}
    out["model_type"] = "mpt"
    out["expansion_ratio"] = raw.get("mlp_ratio", 4)
    out["layer_norm_epsilon"] = raw.get("layer_norm_epsilon", 1e-5)  # torch LayerNorm's default
    out.setdefault("no_bias", False)
    out["attn_config"] = {"attn_type": "multihead_attention", "alibi": raw.get("alibi", False),
                          "alibi_bias_max": raw.get("alibi_bias_max", 8),
                          **{theirs: raw[ours] for ours, theirs in _ATTN_KEYS.items()
                             if ours in raw and ours not in ("alibi", "alibi_bias_max")}}
    return out


def as_hf_mpt_config(raw: dict) -> dict:
    """`raw` converted when it is MosaicGPT's, else `raw` itself (the hook `lm_config_from_hf` calls)."""
    return mpt_config(raw) if is_mosaicgpt(raw) else raw


def mpt_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MosaicGPT tensor names -> HF MPT names (tensors unchanged: Wqkv is [q; k; v] in both).

    Raises:
        ValueError: a key of neither layout (naming it).
    """
    out = {}
    for name, tensor in state.items():
        for pattern, replacement in _RENAMES:
            if re.match(pattern, name):
                out[re.sub(pattern, replacement, name)] = tensor
                break
        else:
            raise ValueError(f"unexpected key '{name}' in the MosaicGPT checkpoint")
    return out


def as_hf_mpt_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` renamed when it has MosaicGPT's names, else `state` itself (the hook
    `read_hf_state_dict` calls)."""
    mosaic = any(re.match(r"^transformer\.(blocks\.\d+\.(ln_1|mlp\.mlp_up)|ln_f)\.", k) for k in state)
    return mpt_state_dict(state) if mosaic else state
