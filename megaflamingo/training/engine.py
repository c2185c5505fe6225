"""The one place that builds DeepSpeed engines (plain or pipeline) from the config tree.

Shapes: B micro-batch, G global batch (samples per optimizer step), M media, T text tokens.

    engine = build_engine(cfg, model, groups, batch_size=G)
    step = build_train_step(engine, groups)                  # training/step.py, plain or pipeline
    out = step(split_batch(global_batch, engine, groups))    # one optimizer step

A batch is a dict: images (B, M, 1, C, S, S), input_ids (B, T), attention_mask (B, T),
labels (B, T) (-100 ignored, aligned with input_ids), loss_weight (B,).

- Layout: G is global; the micro-batch and the accumulation steps follow from the layout
  (`batch_layout`), so every (tp, pp, dp) trains on the same G samples per step and the loss
  (`training.loss`) is the same number as a single process's over the same G samples.
- PP == 1: `FlamingoWithLoss` (the plain Flamingo forward + the loss) in a DeepSpeedEngine with
  our `DeepSpeedMPU` (TP and DP groups), ZeRO 0-3.
- PP > 1: `build_pipeline_module` in a PipelineEngine (ZeRO 0/1; the topology goes into the
  module, not `mpu`).
- Optimizer: torch AdamW over the trainable parameters only (no JIT-built DeepSpeed op), weight
  decay on the cross-attention blocks only (OpenFlamingo, reference §4.3); clipping explicit.
  Without ZeRO it is `SkipNonFiniteAdamW` (the NaN/Inf policy of `training.step`).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from megaflamingo.config import Config, ConfigError
from megaflamingo.models.cross_attention import GatedCrossAttentionBlock
from megaflamingo.models.flamingo import Flamingo
from megaflamingo.models.flops import count_flops
from megaflamingo.parallel.plan import apply_tensor_parallel, gather_full_state, logits_vocab_start
from megaflamingo.parallel.topology import DeepSpeedMPU, ParallelDims, ProcessGroups
from megaflamingo.resolve import batch_layout, check_layout
from megaflamingo.training.loss import FusedHeadLoss, flamingo_loss, head_loss
from megaflamingo.training.lr_groups import with_lr_multipliers
from megaflamingo.training.step import SkipNonFiniteAdamW, TrainStep

__all__ = ["batch_layout", "build_engine", "build_optimizer", "build_rank_local_model", "build_train_step",
           "split_batch", "train_step"]

BATCH_KEYS = ("images", "input_ids", "attention_mask", "labels", "loss_weight")


def skip_shm_op_build() -> None:
    """Stop DeepSpeed JIT-compiling its shared-memory comm op (~35 s; only inference uses it).

    Call before `deepspeed.init_distributed` / `deepspeed.initialize`. `import deepspeed.comm.torch
    as m` would bind the torch module (name shadowing), hence sys.modules.
    """
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_distributed_backend() -> None:
    """Start torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPUs), once per process.

    The environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) comes from the launcher.
    """
    import deepspeed

    from megaflamingo.parallel.topology import import_before_process_group

    skip_shm_op_build()
    import_before_process_group()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


# ----------------------------------------------------------------------------- batch layout


def global_batch_size(cfg: Config) -> int:
    """Samples per optimizer step: the sum over the enabled data streams (those with shards)."""
    streams = [s for s in (cfg.data.laion, cfg.data.mmc4) if s.shards is not None]
    if not streams:
        raise ConfigError("data: no stream has shards; set data.laion.shards or data.mmc4.shards "
                          "(or pass batch_size to build_engine)")
    return sum(s.batch_size for s in streams)


def split_batch(batch: dict[str, torch.Tensor], engine: Any, groups: ProcessGroups) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of a global batch: its DP share, cut into the engine's gas steps.

    Every TP rank and pipeline stage of one replica gets the same samples.
    """
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    start = groups.dp_rank * micro * gas
    return [{k: v[start + i * micro: start + (i + 1) * micro] for k, v in batch.items()} for i in range(gas)]


# ----------------------------------------------------------------------------- config and optimizer


def build_ds_config(cfg: Config, dims: ParallelDims, micro: int, gas: int) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from the config tree (one source of truth)."""
    return {
        "train_batch_size": micro * gas * dims.dp,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.optim.grad_clip,  # DeepSpeed's default is 1.0: always explicit
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # bf16 wrappers skip a step with a NaN/Inf gradient norm (training.step's policy): explicit.
        "bf16": {"enabled": cfg.train.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False, "use_reentrant": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: cross-attention blocks decay, the rest do not.

    OpenFlamingo decays every parameter of its gated cross-attention layers (norms and gates
    included) and nothing else (reference §4.3). Pipeline anchors say their group in the
    `megaflamingo_weight_decay` attribute. Empty groups are left out.
    """
    xattn = {id(p) for m in module.modules() if isinstance(m, GatedCrossAttentionBlock) for p in m.parameters()}
    trainable = [p for p in module.parameters() if p.requires_grad]
    decayed = [id(p) in xattn or getattr(p, "megaflamingo_weight_decay", False) for p in trainable]
    decay = [p for p, d in zip(trainable, decayed) if d]
    rest = [p for p, d in zip(trainable, decayed) if not d]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: Config, module: nn.Module, zero_stage: Optional[int] = None) -> torch.optim.Optimizer:
    """AdamW over `param_groups(module)` with the config's lr, betas and eps.

    Without ZeRO, `SkipNonFiniteAdamW` (DeepSpeed steps it bare); with ZeRO, the stock torch
    AdamW that DeepSpeed's ZeRO optimizers accept (they skip NaN/Inf steps themselves).
    `zero_stage`: the stage the engine runs (None: parallel.zero_stage). torch's fused AdamW
    kernel (one pass per tensor; ~3x faster than the default per-tensor loop on CPU; updates
    equal to it within float rounding, about 1 ulp, not bit for bit).
    """
    o = cfg.optim
    stage = cfg.parallel.zero_stage if zero_stage is None else zero_stage
    kind = SkipNonFiniteAdamW if stage == 0 else torch.optim.AdamW
    groups = with_lr_multipliers(param_groups(module, o.weight_decay), module, o.lr, o.lr_multipliers)
    return kind(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)


def pipeline_layer_costs(cfg: Config, model: Flamingo) -> list[float]:
    """FLOPs per sample of each pipeline layer (embed, L blocks, head), for the stage partition.

    Uses the largest enabled data stream's shapes (mmc4's when none is enabled); falls back to
    `default_layer_costs` for a model `count_flops` cannot count.
    """
    streams = [s for s in (cfg.data.laion, cfg.data.mmc4) if s.shards is not None] or [cfg.data.mmc4]
    stream = max(streams, key=lambda s: s.seq_len * max(1, s.max_num_media))
    try:
        flops = count_flops(cfg.model, stream.seq_len, stream.max_num_media)
    except ValueError:
        from megaflamingo.parallel.pipeline import default_layer_costs

        return default_layer_costs(model)
    num_layers, num_blocks = len(model.lm.layers), max(1, len(model.xattn))
    layer = flops["lm_layers"].total / num_layers
    block = flops["xattn"].total / num_blocks
    head = sum(c.total for c in flops.components if c.name.startswith("lm_head"))
    embed = flops["vision"].total + flops["perceiver"].total
    return [embed, *(layer + (block if str(i) in model.xattn else 0.0) for i in range(num_layers)), head]


# ----------------------------------------------------------------------------- modules


class FlamingoWithLoss(nn.Module):
    """The plain Flamingo forward and the training loss: what a non-pipeline engine runs.

    Args:
        model: the (tensor-parallelised) Flamingo.
        vocab_group: the TP group its logits are sharded over, or None.
        fused_loss: the loss from the final hidden states through `head_loss` (no (B, T, V) logits).
    """

    def __init__(self, model: Flamingo, vocab_group: Optional[dist.ProcessGroup] = None,
                 fused_loss: bool = False) -> None:
        super().__init__()
        self.model, self.vocab_group, self.fused_loss = model, vocab_group, fused_loss
        self.vocab_start = logits_vocab_start(model.lm)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, loss_weight: torch.Tensor) -> torch.Tensor:
        """Args: one micro-batch (module docstring). Returns: the scalar loss."""
        dtype = next(self.model.perceiver.parameters()).dtype
        if self.fused_loss:
            h = self.model.hidden_states(images.to(dtype), input_ids, attention_mask)  # (B, T, D)
            return head_loss(self.model.lm.head(), h, labels, loss_weight, self.vocab_group, self.vocab_start)
        logits = self.model(images.to(dtype), input_ids, attention_mask)  # (B, T, V_local)
        return flamingo_loss(logits, labels, loss_weight, vocab_group=self.vocab_group,
                             vocab_start=self.vocab_start)


def apply_activation_checkpointing(model: Flamingo) -> None:
    """Recompute every decoder layer and cross-attention block in backward (non-reentrant).

    The composable API works through hooks, so parameter names (and checkpoints) do not change.
    """
    from torch.distributed._composable import checkpoint

    for layer in model.lm.layers:
        checkpoint(layer)
    for block in model.xattn.values():
        checkpoint(block)


def build_rank_local_model(cfg: Config, groups: ProcessGroups) -> Flamingo:
    """This rank's model for training: its pipeline stage's layers at their TP shapes, nothing else.

    The process groups come first: the build (`parallel.materialize.build_rank_model`) reads only
    this rank's checkpoint slices, and draws every other initial value from (train.seed, parameter
    name), so each layout starts from the single-process model's values (`models.flamingo.build_model`
    with the same seed). The stage boundaries are the ones `build_engine` uses: the config's
    explicit partition, or the compute-balanced one (`pipeline_layer_costs`), computed on the
    meta-device model.

    Args:
        cfg: the resolved run config.
        groups: this rank's process groups.
    Returns:
        The model (`model.rank_shard` set); parameters of other stages stay on the meta device.
    Raises:
        ConfigError: a bad explicit partition. ValueError / FileNotFoundError: a bad weight file.
    """
    from megaflamingo.parallel.materialize import build_rank_model

    def parts(meta: Flamingo) -> list[int]:
        from megaflamingo.parallel.pipeline import stage_parts

        return stage_parts(meta, groups.dims.pp, cfg.parallel.pipeline_partition, pipeline_layer_costs(cfg, meta))

    model, _ = build_rank_model(cfg.model, groups, parts if groups.dims.pp > 1 else None, seed=cfg.train.seed)
    return model


def _shard_parts(model: Flamingo, dims: ParallelDims) -> list[int] | None:
    """The stage boundaries a rank-local model was built for (None: a plain model, which is
    tensor-parallelised here; every rank holds the same full weights)."""
    shard = getattr(model, "rank_shard", None)
    if shard is None:
        return None
    if shard.tp != dims.tp or (shard.parts is None) != (dims.pp == 1) or (
            shard.parts is not None and len(shard.parts) != dims.pp + 1):
        stages = 1 if shard.parts is None else len(shard.parts) - 1
        raise ConfigError(f"the model was built for tp={shard.tp} pp={stages}, the process groups are {dims}")
    return list(shard.parts) if shard.parts is not None else None


def _build_module(cfg: Config, model: Flamingo, groups: ProcessGroups) -> nn.Module:
    dims = groups.dims
    parts = _shard_parts(model, dims)  # a rank-local model's stages; None: pp = 1 or a plain model
    if getattr(model, "rank_shard", None) is None:  # a rank-local model holds its TP shards already
        apply_tensor_parallel(model, groups)
    if dims.pp == 1:
        if cfg.parallel.activation_checkpointing:
            apply_activation_checkpointing(model)
        return FlamingoWithLoss(model, groups.tp if dims.tp > 1 else None, cfg.model.kernels.fused_loss)
    from megaflamingo.parallel.pipeline import build_pipeline_module

    loss = FusedHeadLoss(model.lm.head()) if cfg.model.kernels.fused_loss else flamingo_loss
    return build_pipeline_module(
        model, groups, loss, partition=cfg.parallel.pipeline_partition, parts=parts,
        costs=pipeline_layer_costs(cfg, model) if parts is None else None,
        activation_checkpointing=cfg.parallel.activation_checkpointing,
    )


def build_engine(cfg: Config, model: Flamingo, groups: ProcessGroups, *, batch_size: int | None = None,
                 micro_batch_size: int | None = None,
                 lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
                 ds_overrides: dict[str, Any] | None = None):
    """Build the DeepSpeed engine that trains `model` on the layout of `groups`.

    Args:
        cfg: the run config (parallel, optim, train.precision; data streams for the batch size).
        model: this rank's model from `build_rank_local_model` (its stage, TP shards), or a plain
            model from `build_model` with the same weights on every rank, tensor-parallelised here
            (in place) when tp > 1.
        groups: this rank's process groups (`build_groups`); their layout must be cfg's.
        batch_size: global samples per optimizer step; None: the enabled streams' sum.
        micro_batch_size: samples per micro-batch per rank; None: see `batch_layout`.
        lr_scheduler: optional callable optimizer -> scheduler, stepped by the engine.
        ds_overrides: extra top-level DeepSpeed config entries (merged over the generated ones).
    Returns:
        A DeepSpeedEngine (pp == 1) or PipelineEngine (pp > 1). Run steps with `build_train_step`.
    Raises:
        ConfigError: an illegal layout, or a batch that does not divide over it.
    """
    import deepspeed

    dims = groups.dims
    if check_layout(cfg, dims.world_size) != dims:
        raise ConfigError(f"parallel: config asks for tp={cfg.parallel.tp} pp={cfg.parallel.pp}, "
                          f"the process groups are {dims}")
    micro, gas = batch_layout(batch_size or global_batch_size(cfg), dims, micro_batch_size)
    ds_config = {**build_ds_config(cfg, dims, micro, gas), **(ds_overrides or {})}
    skip_shm_op_build()
    module = _build_module(cfg, model, groups)
    mpu = DeepSpeedMPU(groups) if dims.pp == 1 else None  # a PipelineModule carries its topology
    optimizer = build_optimizer(cfg, module, ds_config["zero_optimization"].get("stage", 0))
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer,
                                      lr_scheduler=lr_scheduler, config=ds_config, mpu=mpu)
    if isinstance(optimizer, SkipNonFiniteAdamW):  # a bf16 wrapper steps it per group, checking itself
        optimizer.active = engine.optimizer is optimizer
    if dims.dp == 1 and engine.optimizer is optimizer and dims.pp == 1:
        # nothing to average over: DeepSpeed would still copy every gradient into a flat bucket,
        # all-reduce it over a group of one and copy it back (a transient copy of all gradients)
        engine.enable_backward_allreduce = False
    return engine


# ----------------------------------------------------------------------------- running steps


def is_pipeline(engine: Any) -> bool:
    """Whether `engine` is DeepSpeed's PipelineEngine."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def build_train_step(engine: Any, groups: ProcessGroups) -> TrainStep:
    """The step function of `engine` (plain or pipeline, picked here once): see `training.step`."""
    return TrainStep(engine, groups, pipeline=is_pipeline(engine))


def train_step(engine: Any, micro_batches: Sequence[dict[str, torch.Tensor]], groups: ProcessGroups) -> float:
    """One optimizer step through `build_train_step`; returns the global batch's loss.

    The value is the mean over micro-batches and DP ranks, i.e. the loss of the global batch.
    """
    return build_train_step(engine, groups)(micro_batches).loss


def gather_trainable_state(engine: Any) -> dict[str, torch.Tensor]:
    """This rank's trainable parameters in full (ZeRO-3 and TP shards gathered), plain names.

    Collective: every rank must call it. With pipeline stages each rank returns its stage's share
    (pipeline anchors left out).
    """
    import deepspeed

    module = engine.module
    trainable = [p for p in module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
        if is_pipeline(engine):
            from megaflamingo.parallel.pipeline import pipeline_full_state

            return pipeline_full_state(module, trainable_only=True)
        return {k.removeprefix("model."): v for k, v in gather_full_state(module, trainable_only=True).items()}
