"""A megaflamingo model -> a self-contained Hugging Face directory (`trust_remote_code`).

Why not transformers' Idefics classes: an OpenFlamingo-architecture model cannot be expressed in
them with the same logits (ReLU vs GELU Perceiver MLP, RMSNorm + SwiGLU vs LayerNorm + GELU
cross-attention FF, CLS token in the Perceiver context; reference hf_eval_data.md §1). The export
therefore ships its own model code, `hf_remote/*.py` (torch + transformers only), beside:

    config.json                  model_type "megaflamingo", auto_map, the LM's transformers config
    configuration_megaflamingo.py, modeling_megaflamingo.py, processing_megaflamingo.py
    model.safetensors            (sharded with model.safetensors.index.json above 5 GB):
                                 vision.*  perceiver.*  cross_attn.<i>.*  language_model.<HF names>
    generation_config.json       eos = <|endofchunk|>, greedy
    tokenizer files              with <image> / <|endofchunk|> at the model's ids
    preprocessor_config.json     the open_clip evaluation transform (size, mean, std, resize rule)

The plain-LM-plus-adapter form (`write_lm_and_adapter`) is the resized LM as a plain HF
causal-LM directory and `adapter.safetensors` holding the trainable modules under OpenFlamingo's
checkpoint names.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from megaflamingo.config import LMConfig, ModelConfig
from megaflamingo.convert.openflamingo import export_openflamingo_state_dict
from megaflamingo.models.hf_weights import ours_to_hf

REMOTE_DIR = Path(__file__).resolve().parent / "hf_remote"
MAX_SHARD_SIZE = "5GB"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ExportError(ValueError):
    """The model cannot be exported as asked (one line naming what)."""


# ----------------------------------------------------------------------------- LM config


def head_dim(cfg: LMConfig) -> int:
    return cfg.head_dim or cfg.hidden_size // cfg.num_heads


def mlp_width(cfg: LMConfig) -> int:
    return cfg.intermediate_size or 4 * cfg.hidden_size


def rope_type(cfg: LMConfig) -> str:
    scaling = cfg.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _rope_parameters(cfg: LMConfig, **extra) -> dict:
    params = {"rope_type": rope_type(cfg), "rope_theta": float(cfg.rope_theta), **extra}
    for key, value in (cfg.rope_scaling or {}).items():
        if key not in ("type", "rope_type"):
            params[key] = value
    return params


def hf_text_config(cfg: LMConfig, vocab_size: int, token_ids: dict) -> dict:
    """The transformers config (as a dict with model_type) of our decoder `cfg`.

    Args:
        cfg: the LM config.
        vocab_size: rows of the resized embedding (len(tokenizer)).
        token_ids: pad_token_id / eos_token_id / bos_token_id to record (None values dropped).
    Returns:
        The config dict for LlamaConfig / MptConfig / GPTNeoXConfig / Qwen2Config.
    Raises:
        ExportError: an option transformers' class of the family cannot express.
    """
    ids = {k: v for k, v in token_ids.items() if v is not None}
    common = dict(vocab_size=vocab_size, tie_word_embeddings=cfg.tie_word_embeddings,
                  max_position_embeddings=cfg.max_position_embeddings, **ids)
    if cfg.family == "llama":
        return dict(model_type="llama", hidden_size=cfg.hidden_size, intermediate_size=mlp_width(cfg),
                    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                    num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, head_dim=head_dim(cfg),
                    rms_norm_eps=cfg.norm_eps, rope_parameters=_rope_parameters(cfg),
                    attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias, hidden_act=cfg.hidden_act,
                    **common)
    if cfg.family == "qwen2":
        return dict(model_type="qwen2", hidden_size=cfg.hidden_size, intermediate_size=mlp_width(cfg),
                    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                    num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, head_dim=head_dim(cfg),
                    rms_norm_eps=cfg.norm_eps, rope_parameters=_rope_parameters(cfg), hidden_act=cfg.hidden_act,
                    use_sliding_window=False, **common)
    if cfg.family == "gpt_neox":
        return dict(model_type="gpt_neox", hidden_size=cfg.hidden_size, intermediate_size=mlp_width(cfg),
                    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                    layer_norm_eps=cfg.norm_eps, use_parallel_residual=cfg.use_parallel_residual,
                    rope_parameters=_rope_parameters(cfg, partial_rotary_factor=cfg.rotary_pct),
                    attention_bias=cfg.attention_bias, hidden_act=cfg.hidden_act, **common)
    if cfg.family == "mpt":
        if mlp_width(cfg) != 4 * cfg.hidden_size:
            raise ExportError(f"MPT MLP width {mlp_width(cfg)} != 4 * d_model: transformers' MptForCausalLM "
                              f"always builds 4 * d_model")
        if cfg.alibi_bias_max != 8:
            raise ExportError(f"MPT alibi_bias_max={cfg.alibi_bias_max}: transformers' MptForCausalLM uses 8")
        common.pop("max_position_embeddings")
        return dict(model_type="mpt", d_model=cfg.hidden_size, n_heads=cfg.num_heads, n_layers=cfg.num_layers,
                    expansion_ratio=4, max_seq_len=cfg.max_position_embeddings,
                    layer_norm_epsilon=cfg.norm_eps, no_bias=True,
                    attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": cfg.qkv_clip}, **common)
    raise ExportError(f"LM family '{cfg.family}' has no Hugging Face export")


# ----------------------------------------------------------------------------- vision tower


def _visual(model):
    visual = getattr(model.vision, "visual", None)
    if visual is None or not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise ExportError(f"the vision tower {type(model.vision).__name__} is not an open_clip ViT: "
                          f"only open_clip ViT towers export to the Hugging Face format")
    return visual


def vision_config(model) -> dict:
    """ViT sizes for the exported `VisionTower`, read off megaflamingo's open_clip tower."""
    visual = _visual(model)
    block = visual.transformer.resblocks[0]
    if getattr(visual, "attn_pool", None) is not None:
        raise ExportError("open_clip towers with attentional pooling are not exported")
    act = type(block.mlp.gelu).__name__
    if act not in ("GELU", "QuickGELU"):
        raise ExportError(f"open_clip MLP activation {act} is not exported (GELU, QuickGELU)")
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    patch = visual.patch_size if isinstance(visual.patch_size, int) else visual.patch_size[0]
    return {"image_size": int(size), "patch_size": int(patch), "width": int(model.vision.width),
            "layers": len(visual.transformer.resblocks), "heads": int(block.attn.num_heads),
            "mlp_width": int(block.mlp.c_fc.out_features), "norm_eps": float(block.ln_1.eps),
            "act": "quick_gelu" if act == "QuickGELU" else "gelu",
            "layer_scale": not isinstance(block.ls_1, torch.nn.Identity),
            "ln_pre": not isinstance(visual.ln_pre, torch.nn.Identity)}


def _vision_state(model) -> dict[str, torch.Tensor]:
    used = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "transformer.resblocks.")
    return {f"vision.{k}": v for k, v in _visual(model).state_dict().items() if k.startswith(used)}


# ----------------------------------------------------------------------------- whole model


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The exported model's tensors by name (see the module docstring), detached, on the CPU."""
    lm_cfg = model.lm.cfg
    lm = ours_to_hf(model.lm.merged_state_dict(), lm_cfg)
    if "embed_out.weight" in lm:  # GPT-NeoX's head is `lm_head` in transformers 5's modules
        lm["lm_head.weight"] = lm.pop("embed_out.weight")
    if lm_cfg.tie_word_embeddings:
        lm.pop("lm_head.weight", None)
    state = {f"language_model.{k}": v for k, v in lm.items()}
    state.update(_vision_state(model))
    state.update({f"perceiver.{k}": v for k, v in model.perceiver.state_dict().items()})
    state.update({f"cross_attn.{k}": v for k, v in model.xattn.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def hf_config(model, cfg: ModelConfig, tokenizer) -> dict:
    """The keyword arguments of the exported `MegaFlamingoConfig`.

    Raises:
        ExportError: a part the exported code does not implement (non-Perceiver resampler, ...).
    """
    if getattr(cfg, "resampler", "perceiver") != "perceiver":
        raise ExportError(f"model.resampler={cfg.resampler!r}: only the Perceiver resampler is exported")
    ids = {"pad_token_id": cfg.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.bos_token_id}
    perceiver, xattn = cfg.perceiver, cfg.xattn
    return dict(
        text_config=hf_text_config(model.lm.cfg, model.lm.vocab_size, ids),
        vision_config=vision_config(model),
        perceiver_config={"depth": perceiver.depth, "heads": perceiver.heads, "dim_head": perceiver.dim_head,
                          "num_latents": perceiver.num_latents, "ff_mult": perceiver.ff_mult},
        xattn_config={"heads": xattn.heads, "dim_head": xattn.dim_head, "ff_mult": xattn.ff_mult},
        cross_attn_layers=sorted(int(i) for i in model.xattn), media_token_id=cfg.media_token_id,
        eoc_token_id=cfg.eoc_token_id, **ids)


def _remote_classes():
    from megaflamingo.convert.hf_remote.configuration_megaflamingo import MegaFlamingoConfig
    from megaflamingo.convert.hf_remote.modeling_megaflamingo import MegaFlamingoForConditionalGeneration

    MegaFlamingoConfig.register_for_auto_class()
    MegaFlamingoForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    return MegaFlamingoConfig, MegaFlamingoForConditionalGeneration


def _embedding_name(exported) -> str:
    embedding = exported.get_input_embeddings()
    return next(name for name, module in exported.named_modules() if module is embedding) + ".weight"


def build_hf_model(model, cfg: ModelConfig, tokenizer, dtype: torch.dtype = torch.float32):
    """The exported model in memory (the remote-code class), holding `model`'s weights.

    Raises:
        ExportError: the model has a part the export cannot express.
    """
    from transformers import GenerationConfig

    config_cls, model_cls = _remote_classes()
    config = config_cls(**hf_config(model, cfg, tokenizer))
    with torch.device("meta"):
        exported = model_cls(config)
    state = hf_state_dict(model)
    if model.lm.cfg.tie_word_embeddings:  # the head is the embedding (saved once, tied on load)
        state["language_model.lm_head.weight"] = state[_embedding_name(exported)]
    missing, unexpected = exported.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ExportError(f"exported weights do not fit the exported model: missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}")
    exported.tie_weights()
    exported.generation_config = GenerationConfig(
        eos_token_id=cfg.eoc_token_id, pad_token_id=cfg.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        do_sample=False, num_beams=1, max_new_tokens=20)
    return exported.to(dtype).eval()


def image_settings(cfg) -> dict:
    """Image side, mean, std and interpolation of the data pipeline for a run config."""
    from megaflamingo.data.images import vision_image_size

    size, preprocess = vision_image_size(cfg)
    if preprocess.get("resize_mode", "shortest") != "shortest":
        raise ExportError(f"image resize_mode '{preprocess['resize_mode']}' is not exported (shortest only)")
    if not isinstance(size, int) and len(set(size)) != 1:
        raise ExportError(f"non-square image size {size} is not exported")
    return {"image_size": size if isinstance(size, int) else size[0],
            "image_mean": list(preprocess.get("mean") or OPENAI_MEAN),
            "image_std": list(preprocess.get("std") or OPENAI_STD),
            "interpolation": preprocess.get("interpolation") or "bicubic"}


def write_hf_dir(model, run_cfg, tokenizer, out_dir: str | Path, dtype: str = "fp32") -> Path:
    """Write the exported directory (module docstring) into `out_dir` (which must exist, empty).

    Args:
        model: a built (and loaded) megaflamingo `Flamingo`.
        run_cfg: the run's `Config` (model section resolved: token ids set).
        tokenizer: the tokenizer with the Flamingo tokens.
        out_dir: target directory.
        dtype: "fp32" or "bf16" for the stored weights.
    Returns:
        out_dir.
    """
    from megaflamingo.convert.hf_remote.processing_megaflamingo import MegaFlamingoProcessor

    out = Path(out_dir)
    exported = build_hf_model(model, run_cfg.model, tokenizer, DTYPES[dtype])
    exported.save_pretrained(str(out), max_shard_size=MAX_SHARD_SIZE)
    shutil.copy(REMOTE_DIR / "processing_megaflamingo.py", out / "processing_megaflamingo.py")
    MegaFlamingoProcessor(tokenizer, **image_settings(run_cfg)).save_pretrained(out)
    return out


def write_lm_and_adapter(model, tokenizer, out_dir: str | Path, dtype: str = "fp32") -> Path:
    """The resized LM as a plain HF causal-LM directory + `adapter.safetensors` (OpenFlamingo names).

    Args:
        model: a built megaflamingo `Flamingo`.
        tokenizer: its tokenizer (saved beside the LM).
        out_dir: target directory (must exist).
        dtype: "fp32" or "bf16".
    Returns:
        out_dir.
    """
    import json

    from safetensors.torch import save_file

    out, torch_dtype = Path(out_dir), DTYPES[dtype]
    cfg = model.lm.cfg
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.bos_token_id}
    config = hf_text_config(cfg, model.lm.vocab_size, ids)
    config["torch_dtype"] = "bfloat16" if dtype == "bf16" else "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    lm = ours_to_hf(model.lm.merged_state_dict(), cfg)
    if cfg.tie_word_embeddings:
        lm.pop("lm_head.weight", None)
    save_file({k: v.detach().to(torch_dtype).contiguous() for k, v in lm.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))
    adapter = {k: v.to(torch_dtype).clone().contiguous() for k, v in export_openflamingo_state_dict(model).items()}
    save_file(adapter, str(out / "adapter.safetensors"), metadata={"format": "pt"})
    return out
