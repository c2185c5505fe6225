"""Tiny Flamingo models, a synthetic global batch, the single-process reference, and the per-rank runs.

The reference and every distributed layout start from the same weights (one seed: the reference
is `build_model(cfg, seed=SEED)`, each layout builds only its rank's share the way training does,
`build_rank_local_model` with train.seed = SEED; gates opened so every trainable parameter gets a
gradient from step 1) and train on the same
global batch for STEPS optimizer steps. AdamW runs with a large eps, which makes each update
nearly proportional to the (clipped) gradient: equal updated parameters then mean equal
gradients, not just equal gradient signs (Adam with a small eps is blind to a gradient's scale).
The clip norm is below the gradient norm, so the global grad-norm computation is exercised too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from megaflamingo.config import (
    Config,
    KernelsConfig,
    LMConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PerceiverConfig,
    TrainConfig,
    VisionConfig,
    XAttnConfig,
)
from tests.assets import TINY_VISION

STEPS = 3
SEED = 1234
GLOBAL_BATCH = 8
MICRO_BATCH = 2
SEQ_LEN, MAX_MEDIA = 12, 2
BASE_VOCAB, MEDIA, EOC, PAD = 64, 64, 65, 66
VOCAB = 67  # odd on purpose: vocabulary shards of unequal size under TP
OPTIM = OptimConfig(lr=0.5, weight_decay=0.01, eps=1.0, grad_clip=0.05)

FAMILIES = {
    # LLaMA: GQA (4 query heads, 2 kv heads), untied head, a cross-attention block before every layer.
    "llama": dict(lm=dict(family="llama", num_kv_heads=2, intermediate_size=48), every_n=1),
    # MPT: ALiBi, tied head (the added rows train through both ends), a block before every 2nd layer.
    "mpt": dict(lm=dict(family="mpt", tie_word_embeddings=True, intermediate_size=64), every_n=2),
    # GPT-NeoX: partial rotary, parallel residual, biases everywhere (column shards, row replicated).
    "gpt_neox": dict(lm=dict(family="gpt_neox", rotary_pct=0.25, use_parallel_residual=True, attention_bias=True,
                             hidden_act="gelu", intermediate_size=48), every_n=2),
    # Qwen2: q/k/v biases (column shards) without an o bias, GQA, tied head, a block before every layer.
    "qwen2": dict(lm=dict(family="qwen2", num_kv_heads=2, intermediate_size=48, tie_word_embeddings=True),
                  every_n=1),
}


def model_config(family: str) -> ModelConfig:
    spec = FAMILIES[family]
    lm = LMConfig(vocab_size=BASE_VOCAB, hidden_size=32, num_layers=4, num_heads=4, **spec["lm"])
    return ModelConfig(
        vision=VisionConfig(open_clip_config=TINY_VISION), lm=lm,
        cross_attn_every_n_layers=spec["every_n"],
        perceiver=PerceiverConfig(depth=1, heads=2, dim_head=16, num_latents=4, ff_mult=2),
        xattn=XAttnConfig(heads=2, dim_head=16, ff_mult=2),
        kernels=KernelsConfig(xattn="reference"),
        vocab_size=VOCAB, media_token_id=MEDIA, eoc_token_id=EOC, pad_token_id=PAD,
    )


def run_config(family: str, tp: int = 1, pp: int = 1, zero: int = 0, precision: str = "fp32",
               **parallel) -> Config:
    return Config(model=model_config(family), parallel=ParallelConfig(tp=tp, pp=pp, zero_stage=zero, **parallel),
                  optim=OPTIM, train=TrainConfig(precision=precision, seed=SEED))


def open_gates(model):
    """Gates to fixed nonzero values (a rank-local model: those of its stage; the rest are meta)."""
    with torch.no_grad():
        for i, block in enumerate(model.xattn.values()):
            block.attn_gate.fill_(0.5 + 0.1 * i)
            block.ff_gate.fill_(-0.4 - 0.1 * i)
    return model


def build_tiny_model(family: str):
    """The single-process model every run starts from: seed SEED, gates opened."""
    from megaflamingo.models.flamingo import build_model

    return open_gates(build_model(model_config(family), seed=SEED))


def global_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """GLOBAL_BATCH samples with 0, 1 or 2 real images (zero-padded to MAX_MEDIA) and padding.

    Samples 0 and 1 (one whole micro-batch) have no image at all; sample 4 has more `<image>`
    tokens than images (reference semantics: the mean over all latents).
    """
    gen = torch.Generator().manual_seed(seed)
    B, T = GLOBAL_BATCH, SEQ_LEN
    ids = torch.randint(0, BASE_VOCAB, (B, T), generator=gen)
    images = torch.randn(B, MAX_MEDIA, 1, 3, 32, 32, generator=gen)
    image_positions = {2: [1], 3: [0, 6], 4: [0, 4, 8], 5: [3], 6: [2, 7], 7: [5]}
    num_real = {b: min(len(p), MAX_MEDIA) for b, p in image_positions.items()}
    for b in range(B):
        images[b, num_real.get(b, 0):] = 0.0
        for t in image_positions.get(b, []):
            ids[b, t] = MEDIA
            if t + 3 < T:
                ids[b, t + 3] = EOC
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -4:], mask[5, -2:], mask[6, -5:] = 0, 0, 0
    ids = ids.masked_fill(mask == 0, PAD)
    labels = ids.masked_fill((mask == 0) | (ids == MEDIA), -100)
    loss_weight = torch.tensor([1.0, 0.2, 1.0, 0.5, 1.5, 1.0, 0.2, 0.8])
    return {"images": images, "input_ids": ids, "attention_mask": mask, "labels": labels,
            "loss_weight": loss_weight}


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def reference_run(family: str) -> dict:
    """Single process: plain model, torch AdamW with the same groups, same clipping, same loss."""
    from megaflamingo.training.engine import build_optimizer
    from megaflamingo.training.loss import flamingo_loss

    model = build_tiny_model(family)
    cfg = run_config(family)
    opt = build_optimizer(cfg, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = global_batch()
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses, grad_norms = [], []
    for _ in range(STEPS):
        logits = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        loss = flamingo_loss(logits, batch["labels"], batch["loss_weight"])
        loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)))
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"losses": losses, "grad_norms": grad_norms, "initial": initial, "params": params}


# ----------------------------------------------------------------------------- per-rank runs


@dataclass(frozen=True)
class Layout:
    """One distributed layout to train on; dp is what the world leaves."""

    name: str
    family: str = "llama"
    tp: int = 1
    pp: int = 1
    zero: int = 0
    precision: str = "fp32"
    checkpointing: bool = False
    partition: tuple[int, ...] | None = None
    record_partitions: bool = False
    check_old_path: bool = False  # also watch the old build (full model, then TP): it must be caught


def _partition_numbers(engine) -> dict:
    """Per-rank numel of trainable parameters and optimizer state under ZeRO-3, and frozen-param facts."""
    module = engine.module
    trainable = [p for p in module.parameters() if p.requires_grad]
    frozen = [p for p in module.parameters() if not p.requires_grad]
    opt = engine.optimizer
    flat = list(opt.fp32_partitioned_groups_flat)
    state_numel = sum(t.numel() for f in flat for t in opt.optimizer.state.get(f, {}).values()
                      if torch.is_tensor(t) and t.dim() > 0)
    in_optimizer = {id(p) for g in opt.optimizer.param_groups for p in g["params"]}
    return {
        "trainable_full": sum(p.ds_numel for p in trainable),
        "trainable_local": sum(p.ds_tensor.numel() for p in trainable),
        "fp32_master_local": sum(f.numel() for f in flat),
        "adam_state_local": state_numel,
        "frozen_with_grad": sum(p.grad is not None for p in frozen),
        "frozen_in_optimizer": sum(id(p) in in_optimizer for p in frozen),
        "frozen_full": sum(p.ds_numel for p in frozen),
        "frozen_local": sum(p.ds_tensor.numel() for p in frozen),
        "frozen_count": len(frozen),
    }


def _watched_build(cfg: Config, groups, layout: Layout) -> tuple[object, dict]:
    """The training path's rank-local build under a `watch.BuildWatch`; what it (and, when asked,
    the old full-model build) materialised beyond the rank's share."""
    from megaflamingo.parallel.plan import apply_tensor_parallel
    from megaflamingo.training.engine import build_rank_local_model
    from tests.parallel.watch import BuildWatch, tp_full_shapes

    with BuildWatch() as watch:
        model = build_rank_local_model(cfg, groups)
    held = [p for p in model.parameters() if p.device.type != "meta"]
    full_shapes = tp_full_shapes(cfg.model, layout.tp)
    out = {"build_problems": watch.problems(held, full_shapes), "held_numel": sum(p.numel() for p in held)}
    if layout.check_old_path:  # what training did before: the whole model, then the TP plan
        from megaflamingo.models.flamingo import construct_model

        with BuildWatch() as old:
            apply_tensor_parallel(construct_model(cfg.model), groups)
        out["old_path_problems"] = old.problems(held, full_shapes)
    return open_gates(model), out


def train_layout(layout: Layout, world_size: int) -> dict:
    """Build the layout's groups, then this rank's model the way training does (only its share),
    its engine; train STEPS steps; losses, gathered parameters, what the build materialised."""
    from megaflamingo.parallel.topology import ParallelDims, build_groups
    from megaflamingo.training.engine import build_engine, gather_trainable_state, split_batch, train_step

    dims = ParallelDims.from_world(world_size, tp=layout.tp, pp=layout.pp)
    groups = build_groups(dims)
    cfg = run_config(layout.family, tp=layout.tp, pp=layout.pp, zero=layout.zero, precision=layout.precision,
                     activation_checkpointing=layout.checkpointing,
                     pipeline_partition=None if layout.partition is None else list(layout.partition))
    model, built = _watched_build(cfg, groups, layout)
    engine = build_engine(cfg, model, groups, batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH,
                          ds_overrides={"zero_optimization": {"stage": layout.zero,
                                                              "stage3_param_persistence_threshold": 0}})
    batch = global_batch()
    losses = [train_step(engine, split_batch(batch, engine, groups), groups) for _ in range(STEPS)]
    frozen = [p for p in engine.module.parameters() if not p.requires_grad]
    out = {"losses": losses, "params": {k: v.float() for k, v in gather_trainable_state(engine).items()},
           "gas": engine.gradient_accumulation_steps(), "frozen_with_grad": sum(p.grad is not None for p in frozen),
           **built}
    if layout.record_partitions:
        out["partitions"] = _partition_numbers(engine)
    engine.destroy()
    return out


def run_layouts(rank: int, world_size: int, layouts: list[Layout]) -> dict:
    """What one rank runs: every layout in turn (one spawn, many checks)."""
    results = {}
    for layout in layouts:
        start = time.perf_counter()
        results[layout.name] = train_layout(layout, world_size)
        results[layout.name]["seconds"] = time.perf_counter() - start
    return results


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def with_family(layouts: list[Layout], family: str) -> list[Layout]:
    return [replace(l, name=f"{family}:{l.name}", family=family) for l in layouts]
