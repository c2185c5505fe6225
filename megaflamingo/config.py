"""The typed config tree: dataclasses, YAML loading, dotted overrides, validation.

One source of truth for a run. `load_config(path, overrides)` reads a YAML file into the tree,
applies `section.key=value` overrides, and validates everything that can be checked without
starting a process group. Every user error raises `ConfigError` with one clear line; the CLIs
turn it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A user error in a config file or override: one line that says what is wrong."""


# ----------------------------------------------------------------------------- model


@dataclass
class VisionConfig:
    """The frozen open_clip vision tower."""

    open_clip_model: Optional[str] = None
    """A named open_clip architecture, e.g. "ViT-L-14" (weights from `weights`)."""
    open_clip_config: Optional[dict] = None
    """An inline open_clip model config ({"embed_dim":..., "vision_cfg": {...}}), for tiny towers."""
    weights: Optional[str] = None
    """Local open_clip checkpoint file (state dict of the CLIP model or of its `visual`). None: random.
    For kind "timm": the timm model's state dict (names, or the same tensors in the same order)."""
    kind: str = "open_clip"
    """"open_clip" (ViT patch tokens before ln_post) or "timm" (a CNN feature map as tokens)."""
    timm_model: Optional[str] = None
    """kind "timm": the timm architecture, e.g. "efficientnet_lite0"."""
    stage: int = -1
    """kind "timm": which feature map (index into the model's feature_info; -1: the last)."""
    image_size: Optional[int] = None
    """kind "timm": the tower's input side; images of another size are resized in the tower."""
    mean: Optional[list] = None
    """kind "timm": the tower's input normalisation mean (None: timm's pretrained_cfg)."""
    std: Optional[list] = None
    """kind "timm": the tower's input normalisation std (None: timm's pretrained_cfg)."""


@dataclass
class LMConfig:
    """The frozen decoder LM: a local Hugging Face checkpoint dir, or an inline family + sizes."""

    hf_path: Optional[str] = None
    """Local HF checkpoint directory (config.json + safetensors/bin). Overrides the inline sizes."""
    family: str = "llama"
    """One of "llama", "mpt", "gpt_neox"."""
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    """GQA key/value heads (LLaMA); None means num_heads."""
    head_dim: Optional[int] = None
    """Per-head width (LLaMA may set it); None means hidden_size // num_heads."""
    intermediate_size: Optional[int] = None
    """MLP width; None means 4 * hidden_size (MPT: expansion_ratio * hidden_size)."""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    """HF rope_scaling dict (llama3 / linear / dynamic ...), as in the checkpoint's config.json."""
    rotary_pct: float = 1.0
    """GPT-NeoX: fraction of each head's dims that get rotary embeddings."""
    use_parallel_residual: bool = True
    """GPT-NeoX: attention and MLP read the same input (RedPajama-INCITE)."""
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    alibi_bias_max: int = 8
    """MPT: ALiBi slope parameter."""
    qkv_clip: Optional[float] = None
    """MPT clip_qkv."""
    mlp_bias: bool = False
    """MLP linears carry biases (GPT-NeoX: always; LLaMA: mlp_bias; MPT: never)."""
    attention_bias: bool = False
    """q/k/v/o linears carry biases (GPT-NeoX: attention_bias; LLaMA: attention_bias; MPT: never)."""
    hidden_act: str = "silu"
    """MLP activation, transformers' name (silu, gelu, gelu_new, ...). MPT always uses exact GELU."""


@dataclass
class PerceiverConfig:
    """The Perceiver resampler (OpenFlamingo defaults)."""

    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    num_latents: int = 64
    ff_mult: int = 4
    latent_init_std: float = 1.0
    """Std of the latents' normal init (OpenFlamingo: 1.0, torch.randn)."""


@dataclass
class XAttnConfig:
    """The gated cross-attention blocks (OpenFlamingo defaults)."""

    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    gate_init: float = 0.0
    """Initial value of every attn/ff gate before tanh (OpenFlamingo: 0, the block starts as identity)."""


@dataclass
class KernelsConfig:
    """Which implementation runs each op."""

    xattn: str = "auto"
    """Media-indexed cross-attention: "auto" (Triton on CUDA, reference elsewhere), "triton", "reference"."""
    fused_loss: bool = True
    """Training loss through the fused linear + cross entropy (`training.loss.head_loss`; the same
    loss and gradients as the full logits in fp32, without the (B, T, V) logits); False: full logits."""


@dataclass
class ModelConfig:
    """A Flamingo model: vision tower, perceiver, cross-attention stack around a decoder LM."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    tokenizer: Optional[str] = None
    """Local HF tokenizer dir; `<image>`, `<|endofchunk|>`, `<PAD>` are added as OpenFlamingo does."""
    cross_attn_every_n_layers: int = 1
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    resampler: str = "perceiver"
    """"perceiver" (OpenFlamingo) or "none" (LayerNorm of the tower tokens are the media)."""
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    vocab_size: Optional[int] = None
    """Rows of the resized embedding (= len(tokenizer)); filled from the tokenizer when None."""
    media_token_id: Optional[int] = None
    """Id of `<image>`; filled from the tokenizer when None."""
    eoc_token_id: Optional[int] = None
    """Id of `<|endofchunk|>`; filled from the tokenizer when None."""
    pad_token_id: Optional[int] = None
    """Id of the pad token; filled from the tokenizer when None."""
    freeze_lm_embeddings: bool = False
    """True: the added token rows are frozen too (OpenFlamingo --freeze_lm_embeddings)."""
    openflamingo_checkpoint: Optional[str] = None
    """A released-format OpenFlamingo checkpoint.pt to import after building."""
    frozen_dtype: Optional[str] = None
    """"bf16" or "fp32": dtype of the frozen weights (vision tower, LM) when each rank builds only its
    shard (`parallel.materialize`) and in `launcher/plan.py`; None: the training precision."""


# ----------------------------------------------------------------------------- rest of the run


@dataclass
class ParallelConfig:
    """The 3D layout; dp = world_size / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    pipeline_partition: Optional[list] = None
    """Explicit stage boundaries (block indices), overriding the compute-balanced partition."""
    activation_checkpointing: bool = False


@dataclass
class StreamConfig:
    """One training data stream (LAION-style pairs or MMC4-style interleaved documents)."""

    shards: Optional[str] = None
    """Brace-expandable shard path(s), e.g. "data/laion/{000..099}.tar". None: stream off."""
    batch_size: int = 8
    """Global samples per optimizer step from this stream."""
    micro_batch_size: Optional[int] = None
    """Samples per micro-batch on one DP rank; None: the rank's whole share (batch_size / dp).
    Micro-batches per step from this stream = batch_size / (dp * micro_batch_size)."""
    loss_multiplier: float = 1.0
    seq_len: int = 32
    max_num_media: int = 1
    resampled: bool = False
    """Draw shards with replacement per reader and epoch (OpenFlamingo --dataset_resampled)."""
    shuffle_buffer: int = 0
    """Shuffle samples inside each shard in blocks of this many (0 or 1: file order)."""
    answer_only_loss: bool = False
    """VQA-style captions "Question:{q} Short answer:{a}": loss on the answer (and what follows) only."""


@dataclass
class MMC4Options:
    """MMC4-only preprocessing rules (reference §4.1)."""

    sim_threshold: float = 0.24
    min_num_images: int = 1
    matching: str = "one_to_one"
    """"one_to_one" (Hungarian, the default) or "argmax" (what the released models used)."""
    min_image_bytes: int = 11000
    """Images with fewer encoded bytes are dropped (the reference's `len // 1000 <= 10`).
    easy-vqa's 64x64 images are ~1 KB: use 0 for shards written by prepare_data.py easy-vqa."""
    single_image_keep_prob: float = 0.5


@dataclass
class DataConfig:
    """Training data: two streams, preprocessing, loaders."""

    laion: StreamConfig = field(default_factory=lambda: StreamConfig(loss_multiplier=0.2))
    mmc4: StreamConfig = field(
        default_factory=lambda: StreamConfig(seq_len=256, max_num_media=6, loss_multiplier=1.0)
    )
    mmc4_options: MMC4Options = field(default_factory=MMC4Options)
    image_size: Optional[int] = None
    """Image side; None: the vision tower's."""
    workers: int = 0
    seed: int = 42
    canonical_readers: int = 0
    """Virtual readers that deal every global batch (data/dealing.py); must divide each stream's
    batch_size and be divisible by every dp the run uses; 0: the gcd of the batch sizes (its
    largest divisor <= 256)."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "constant"
    """"constant", "linear" or "cosine", each with linear warmup."""
    warmup_steps: int = 0
    lr_multipliers: dict = field(default_factory=dict)
    """{name part: factor}: trainable parameters whose name contains the part train at lr x factor
    (e.g. {"_gate": 10.0}); the first matching part wins."""


@dataclass
class TrainConfig:
    steps: int = 10
    output_dir: str = "runs/default"
    precision: str = "fp32"
    """"fp32" or "bf16"."""
    seed: int = 42
    max_skipped_steps_in_a_row: int = 10
    probe_data: Optional[str] = None
    """A VQA-format jsonl: every `probe_every` steps, rank 0 logs the answer loss on it with real
    and with blank images (`probe/answer_loss_real`, `probe/answer_loss_blank`)."""
    probe_every: int = 0
    probe_limit: int = 64
    """Questions of probe_data used by the probe."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N steps; 0 = never."""
    keep_last: int = 2
    resume: Optional[str] = None


@dataclass
class LoggingConfig:
    every: int = 1
    tensorboard: bool = True
    wandb_project: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, current: Any = None) -> Any:
    """Check (and gently convert) `value` against the annotated type `tp`.

    A nested section is merged over `current` (the field's default), so a partial YAML section
    keeps the defaults of the keys it does not mention (e.g. mmc4's seq_len 256).
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where, current)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where, current)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp in (dict, list):
        if isinstance(value, tp):
            return value
    elif tp is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    else:
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict, where: str, base: Any = None) -> Any:
    """`base` (default: cls()) with the keys of `data` replaced, recursively."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = dataclasses.replace(base) if base is not None else cls()
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{where}.{key}'{hint}".replace("'.", "'"))
        setattr(out, key, _coerce(value, hints[key], f"{where}.{key}".lstrip("."), getattr(out, key)))
    return out


def _parse_scalar(text: str) -> Any:
    """An override value is read as YAML: 3e-4 -> float, true -> bool, [1,2] -> list, null -> None."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    return value


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = _parse_scalar(text)


def config_from_dict(raw: dict, overrides: Sequence[str] = ()) -> Config:
    """Build and validate a `Config` from a plain dict (as read from YAML) plus overrides."""
    raw = yaml.safe_load(yaml.safe_dump(raw or {}))  # deep copy
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config file, apply `key=value` overrides and validate.

    Args:
        path: YAML file whose top-level sections are those of `Config`.
        overrides: dotted overrides such as `optim.lr=3e-4` or `parallel.tp=2`.
    Returns:
        The validated `Config`.
    Raises:
        ConfigError: missing file, bad YAML, unknown key, wrong type, or an invalid value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(raw or {}, overrides)


def to_dict(cfg: Any) -> dict:
    """The config as plain data (for writing `config.yaml` beside a run)."""
    data = dataclasses.asdict(cfg)
    return yaml.safe_load(yaml.safe_dump(data, sort_keys=False).replace("!!python/tuple", ""))


# ----------------------------------------------------------------------------- validation


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _check_path(path: Optional[str], key: str) -> None:
    if path is not None and not Path(path).exists():
        raise ConfigError(f"{key}: path does not exist: {path}")


def _check_vision(v: VisionConfig) -> None:
    _check(v.kind in ("open_clip", "timm"), f"model.vision.kind: expected open_clip or timm, got '{v.kind}'")
    if v.kind == "timm":
        _check(v.timm_model is not None and v.image_size is not None,
               "model.vision: kind timm needs timm_model and image_size")
        _check_path(v.weights, "model.vision.weights")
        return
    _check(
        (v.open_clip_model is None) != (v.open_clip_config is None),
        "model.vision: set exactly one of open_clip_model or open_clip_config",
    )
    if v.open_clip_config is not None:
        for key, kind in (("embed_dim", int), ("vision_cfg", dict)):
            _check(isinstance(v.open_clip_config.get(key), kind),
                   f"model.vision.open_clip_config: missing '{key}' ({kind.__name__}); an open_clip model "
                   f"config looks like {{embed_dim: 512, vision_cfg: {{image_size: 224, ...}}}}")
    _check_path(v.weights, "model.vision.weights")


def validate_model(m: ModelConfig) -> None:
    """Check a model config: paths exist, sizes are consistent, choices are known.

    What needs a file read (the LM checkpoint's sizes, the tokenizer's ids) is checked by
    `megaflamingo.resolve.resolve_model`, at the start of a run.
    """
    lm = m.lm
    _check_vision(m.vision)
    _check(m.resampler in ("perceiver", "none"),
           f"model.resampler: expected perceiver or none, got '{m.resampler}'")
    _check_path(lm.hf_path, "model.lm.hf_path")
    _check_path(m.tokenizer, "model.tokenizer")
    _check_path(m.openflamingo_checkpoint, "model.openflamingo_checkpoint")
    if lm.hf_path is None:
        _check(lm.hidden_size % lm.num_heads == 0,
               f"model.lm: hidden_size {lm.hidden_size} is not divisible by num_heads {lm.num_heads}")
        kv = lm.num_kv_heads or lm.num_heads
        _check(lm.num_heads % kv == 0,
               f"model.lm: num_heads {lm.num_heads} is not divisible by num_kv_heads {kv}")
    _check(m.cross_attn_every_n_layers >= 1, "model.cross_attn_every_n_layers must be >= 1")
    _check(m.frozen_dtype in (None, "bf16", "fp32"),
           f"model.frozen_dtype: expected bf16 or fp32, got '{m.frozen_dtype}'")
    _check(m.kernels.xattn in ("auto", "triton", "reference"),
           f"model.kernels.xattn: expected auto, triton or reference, got '{m.kernels.xattn}'")
    for name in ("depth", "heads", "dim_head", "num_latents", "ff_mult"):
        _check(getattr(m.perceiver, name) >= 1, f"model.perceiver.{name} must be >= 1")
    for name in ("heads", "dim_head", "ff_mult"):
        _check(getattr(m.xattn, name) >= 1, f"model.xattn.{name} must be >= 1")
    if m.tokenizer is None:  # an hf_path does not give the Flamingo tokens either
        for name in ("media_token_id", "eoc_token_id"):
            _check(getattr(m, name) is not None,
                   f"model.{name} must be set when model.tokenizer is not given")


def validate(cfg: Config) -> None:
    """Validate a whole config; raises ConfigError with one line on the first problem.

    The parallel layout is checked against a world size by `megaflamingo.resolve.check_layout`.
    """
    validate_model(cfg.model)
    _check(cfg.optim.schedule in ("constant", "linear", "cosine"),
           f"optim.schedule: expected constant, linear or cosine, got '{cfg.optim.schedule}'")
    _check(cfg.train.precision in ("fp32", "bf16"),
           f"train.precision: expected fp32 or bf16, got '{cfg.train.precision}'")
    _check(cfg.data.mmc4_options.matching in ("one_to_one", "argmax"),
           f"data.mmc4_options.matching: expected one_to_one or argmax, "
           f"got '{cfg.data.mmc4_options.matching}'")
    _check(cfg.train.steps >= 0, "train.steps must be >= 0")
    _check(cfg.checkpoint.every >= 0, "checkpoint.every must be >= 0")
