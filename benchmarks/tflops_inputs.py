"""What benchmarks/tflops.py trains: the config (random weights, known shapes) and one synthetic batch.

Shapes: B micro-batch, T text tokens, M images per sample, S image side.

- `benchmark_config(path, overrides)`: a run config with every missing local path replaced: the
  vision tower from its open_clip config without weights, a released LM path (`lm/mpt-7b`, ...)
  as the inline sizes of `KNOWN_LMS` (from each model's public config.json), the tokenizer as its
  known length; then resolved (`megaflamingo.resolve`) like a training run's.
- `default_config(device)`: what runs without --config, sized to the device: OpenFlamingo-9B
  shapes on a GPU with >= 120 GiB, OpenFlamingo-3B shapes on other GPUs, a small LLaMA-like
  Flamingo on a CPU (d=512 x 8 layers, 32k vocabulary, cross-attention every 2nd layer, a small
  ViT; MMC4-shaped micro-batches of B=2, T=256, M=5).
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from megaflamingo.config import Config, ConfigError, config_from_dict
from megaflamingo.config import _apply_override as apply_override  # the loader's own key=value rule
from megaflamingo.models.flops import vision_shape
from megaflamingo.resolve import resolve_model

ROOT = Path(__file__).resolve().parents[1]

# Released LM checkpoints the configs point at, by directory name: sizes from each model's public
# config.json; tokenizer_len is len() of its tokenizer (EleutherAI gpt-neox-20b: 50,277), before
# OpenFlamingo adds <|endofchunk|>, <image> and <PAD> (reference/openflamingo.md §0.6).
KNOWN_LMS = {
    "mpt-7b": dict(family="mpt", vocab_size=50432, hidden_size=4096, num_layers=32, num_heads=32,
                   intermediate_size=16384, tie_word_embeddings=True, tokenizer_len=50277),
    "mpt-1b-redpajama-200b": dict(family="mpt", vocab_size=50432, hidden_size=2048, num_layers=24,
                                  num_heads=16, intermediate_size=8192, tie_word_embeddings=True,
                                  tokenizer_len=50277),
    "RedPajama-INCITE-Base-3B-v1": dict(
        family="gpt_neox", vocab_size=50432, hidden_size=2560, num_layers=32, num_heads=32,
        intermediate_size=10240, rotary_pct=1.0, use_parallel_residual=False, hidden_act="gelu",
        attention_bias=True, mlp_bias=True, tie_word_embeddings=False, tokenizer_len=50277),
    "Meta-Llama-3-70B": dict(family="llama", vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64,
                             num_kv_heads=8, intermediate_size=28672, rope_theta=500000.0,
                             max_position_embeddings=8192, tie_word_embeddings=False, tokenizer_len=128256),
}


# The CPU default: OpenFlamingo's layout (Perceiver, gated cross-attention every 2nd layer, MMC4
# interleaving) at a size two CPU cores train in seconds per step.
CPU_DEFAULT = {
    "model": {
        "vision": {"open_clip_config": {"embed_dim": 256, "vision_cfg": {
            "image_size": 64, "patch_size": 16, "width": 256, "layers": 4, "head_width": 64},
            # open_clip builds a whole CLIP (the baseline's factory does): a token text tower
            "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}},
        "lm": {"family": "llama", "vocab_size": 32000, "hidden_size": 512, "num_layers": 8, "num_heads": 8,
               "intermediate_size": 1376},
        # OpenFlamingo's additions after the base vocabulary: <|endofchunk|>, <image>, <PAD>
        "vocab_size": 32003, "eoc_token_id": 32000, "media_token_id": 32001, "pad_token_id": 32002,
        "cross_attn_every_n_layers": 2,
        "perceiver": {"depth": 2, "heads": 8, "dim_head": 64, "num_latents": 32},
        "xattn": {"heads": 8, "dim_head": 64},
    },
    "data": {"mmc4": {"seq_len": 256, "max_num_media": 5, "micro_batch_size": 2, "batch_size": 2}},
}


def _missing(path: str | None) -> bool:
    return path is not None and not Path(path).exists()


def _replace_lm(model: dict, notes: list[str], pinned: set[str]) -> None:
    """An absent released LM directory -> its inline sizes and the token ids its tokenizer gives.

    As with a real hf_path, the checkpoint's sizes win over inline ones, except the `pinned` keys
    (given as command-line overrides).
    """
    lm = model.get("lm") or {}
    if not _missing(lm.get("hf_path")):
        return
    name = Path(lm["hf_path"]).name
    if name not in KNOWN_LMS:
        raise ConfigError(f"model.lm.hf_path {lm['hf_path']} does not exist and '{name}' is not in "
                          f"KNOWN_LMS ({', '.join(KNOWN_LMS)}): give inline sizes (model.lm.family=... "
                          f"model.lm.hf_path=null)")
    sizes = dict(KNOWN_LMS[name])
    n = sizes.pop("tokenizer_len")
    model["lm"] = {**sizes, **{k: v for k, v in lm.items() if k in pinned - {"hf_path"}}}
    if _missing(model.get("tokenizer")) or model.get("tokenizer") is None:
        # OpenFlamingo's order: <|endofchunk|>, <image>, then <PAD>.
        for key, value in (("vocab_size", n + 3), ("eoc_token_id", n), ("media_token_id", n + 1),
                           ("pad_token_id", n + 2)):
            model.setdefault(key, value)
    notes.append(f"LM {name}: inline sizes from KNOWN_LMS, random weights, vocab {n + 3}")


def benchmark_config(path: str, overrides: list[str]) -> tuple[Config, list[str]]:
    """Load a run config for benchmarking: absent local paths become random weights / known sizes.

    Returns:
        The validated config and human-readable notes on what was substituted.
    Raises:
        ConfigError: an unreadable config, an unknown absent LM, or a bad override.
    """
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    raw, notes = yaml.safe_load(Path(path).read_text()) or {}, []
    for item in overrides:  # before the substitutions, so an overridden path is substituted too
        apply_override(raw, item)
    model = raw.setdefault("model", {})
    vision = model.setdefault("vision", {})
    if _missing(vision.get("weights")):
        notes.append(f"vision {vision.get('open_clip_model', 'inline')}: random weights")
        vision.pop("weights")
    _replace_lm(model, notes, {o.split("=", 1)[0].removeprefix("model.lm.") for o in overrides
                               if o.startswith("model.lm.")})
    for key in ("tokenizer", "openflamingo_checkpoint"):
        if _missing(model.get(key)):
            model.pop(key)
    for stream in (raw.get("data") or {}).values():
        if isinstance(stream, dict):
            stream.pop("shards", None)
    cfg = config_from_dict(raw)
    cfg.model = resolve_model(cfg.model)
    return cfg, notes


def default_config(device: torch.device, overrides: list[str]) -> tuple[Config, list[str], str]:
    """What runs without --config: (config, notes, a name for the report); see the module docstring."""
    if device.type != "cuda":
        raw = yaml.safe_load(yaml.safe_dump(CPU_DEFAULT))
        for item in overrides:
            apply_override(raw, item)
        cfg = config_from_dict(raw)
        cfg.model = resolve_model(cfg.model)
        return cfg, ["no --config: a small LLaMA-like Flamingo sized for a CPU, random weights"], "default-cpu"
    memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    name = "openflamingo-9b" if memory_gib >= 120 else "openflamingo-3b"
    micro = {"openflamingo-9b": 4, "openflamingo-3b": 8}[name]
    cfg, notes = benchmark_config(str(ROOT / "configs" / f"{name}.yaml"),
                                  ["train.precision=bf16", f"data.mmc4.micro_batch_size={micro}", *overrides])
    return cfg, [f"no --config: {name} shapes for a GPU with {memory_gib:.0f} GiB, bf16, B={micro}", *notes], name


# ----------------------------------------------------------------------------- inputs


def synthetic_batch(cfg: Config, B: int, T: int, M: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One fixed micro-batch: M images, `<image>` at t = k * T // M (each chunk closed by EOC)."""
    m = cfg.model
    S = vision_shape(m).image_size
    gen = torch.Generator().manual_seed(0)
    top = min(i for i in (m.media_token_id, m.eoc_token_id, m.pad_token_id) if i is not None)
    ids = torch.randint(0, top, (B, T), generator=gen)
    starts = [k * T // M for k in range(M)]
    ids[:, starts] = m.media_token_id
    ids[:, [s - 1 for s in starts[1:]]] = m.eoc_token_id
    labels = ids.masked_fill(ids == m.media_token_id, -100)
    images = torch.randn(B, M, 1, 3, S, S, generator=gen)
    batch = dict(images=images, input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                 loss_weight=torch.ones(B))
    return {k: v.to(device) for k, v in batch.items()}
