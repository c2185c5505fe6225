"""Tiny random transformers decoder LMs saved to disk, for parity and loading tests.

`save_tiny_hf_lm(variant, out_dir)` builds one of `VARIANTS` with transformers' own classes,
overwrites its weights with visibly random values and `save_pretrained`s it (fp32, safetensors).
The randomisation matters: transformers initialises tiny models with std 0.02 and norms at 1 /
biases at 0, which would let a wrong norm, bias or head mapping pass a parity test unnoticed.

Sizes fit a ~303-token tokenizer (vocab 320), hidden 64, 2-3 layers, 4 heads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB_SIZE = 320

# variant -> (model_type, config kwargs). Every variant differs from the others in something the
# decoder must get right (GQA, tying, a RoPE scaling rule, ALiBi slopes, partial rotary, residual).
_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama_gqa": ("llama", dict(
        num_hidden_layers=3, num_key_value_heads=2, intermediate_size=96,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False)),
    "llama_tied": ("llama", dict(
        num_hidden_layers=2, num_key_value_heads=4, intermediate_size=128, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True)),
    "llama_rope_linear": ("llama", dict(
        num_hidden_layers=2, num_key_value_heads=2, intermediate_size=96,
        rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 10000.0})),
    "llama_rope_llama3": ("llama", dict(
        num_hidden_layers=2, num_key_value_heads=1, intermediate_size=96,
        # original_max_position_embeddings 64 puts the head's 8 wavelengths, 2pi * 10000^(i/8),
        # in all three llama3 bands: kept (< 16), smoothed (16..64), divided by factor (> 64).
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                         "rope_theta": 10000.0})),
    "llama_rope_dynamic": ("llama", dict(
        num_hidden_layers=2, num_key_value_heads=2, intermediate_size=96,
        # max_position_embeddings 8 < the tests' sequence length, so the NTK rescaling is active.
        max_position_embeddings=8,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    "mpt": ("mpt", dict(n_layers=2, attn_config={"clip_qkv": 1.0, "alibi_bias_max": 8})),
    "mpt_6_heads": ("mpt", dict(
        # a head count that is not a power of two takes MPT's interleaved-slope branch
        d_model=96, n_heads=6, n_layers=2)),
    "gpt_neox_parallel": ("gpt_neox", dict(
        num_hidden_layers=2, intermediate_size=128, use_parallel_residual=True, hidden_act="gelu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.25})),
    "gpt_neox_sequential": ("gpt_neox", dict(
        num_hidden_layers=2, intermediate_size=160, use_parallel_residual=False,
        hidden_act="gelu_new",
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0,
                         "partial_rotary_factor": 0.5})),
    "qwen2_untied": ("qwen2", dict(
        num_hidden_layers=2, num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen2_tied": ("qwen2", dict(
        num_hidden_layers=3, num_key_value_heads=1, intermediate_size=128, tie_word_embeddings=True)),
}

VARIANTS: tuple[str, ...] = tuple(_VARIANTS)
"""Names accepted by `save_tiny_hf_lm`."""


def tiny_hf_config(variant: str, **overrides: Any):
    """The transformers config object of one variant (`overrides` replace config kwargs)."""
    from transformers import GPTNeoXConfig, LlamaConfig, MptConfig, Qwen2Config

    if variant not in _VARIANTS:
        raise ValueError(f"unknown tiny LM variant '{variant}'; choose from {', '.join(VARIANTS)}")
    model_type, kwargs = _VARIANTS[variant]
    kwargs = {"vocab_size": VOCAB_SIZE, **kwargs, **overrides}
    if model_type == "llama":
        return LlamaConfig(**{"hidden_size": 64, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
                              **kwargs})
    if model_type == "mpt":
        return MptConfig(**{"d_model": 64, "n_heads": 4, "max_seq_len": 64, **kwargs})
    if model_type == "qwen2":
        return Qwen2Config(**{"hidden_size": 64, "num_attention_heads": 4, "rms_norm_eps": 1e-5, **kwargs})
    return GPTNeoXConfig(**{"hidden_size": 64, "num_attention_heads": 4, **kwargs})


@torch.no_grad()
def randomize_weights_(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every parameter with clearly non-default random values, in place.

    Matrices (and embeddings) get std 0.15, biases std 0.1, 1-D norm weights 1 + N(0, 0.1^2).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if param.ndim >= 2:
            param.copy_(0.15 * noise)
        elif name.endswith("bias"):
            param.copy_(0.1 * noise)
        else:
            param.copy_(1.0 + 0.1 * noise)


def build_tiny_hf_lm(variant: str, seed: int = 0, **overrides: Any):
    """A randomised fp32 transformers causal LM of one variant, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(variant, **overrides),
                                             dtype=torch.float32)
    randomize_weights_(model, seed)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def save_tiny_hf_lm(variant: str, out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Build a randomised tiny transformers LM and `save_pretrained` it (fp32 safetensors).

    Args:
        variant: one of `VARIANTS` (llama_gqa, llama_tied, llama_rope_linear, llama_rope_llama3,
            llama_rope_dynamic, mpt, mpt_6_heads, gpt_neox_parallel, gpt_neox_sequential,
            qwen2_untied, qwen2_tied).
        out_dir: directory to write config.json + model.safetensors into (created if needed).
        seed: weight seed.
        **overrides: transformers config kwargs replacing the variant's (e.g. vocab_size=303).
    Returns:
        `out_dir` as a Path.
    Raises:
        ValueError: unknown variant.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tiny_hf_lm(variant, seed, **overrides).save_pretrained(str(out_dir))
    return out_dir
