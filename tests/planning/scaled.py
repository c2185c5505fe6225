"""A scaled-down OpenFlamingo-9B whose training-step memory can be measured on the CPU.

Same architecture as configs/openflamingo-9b.yaml (MPT decoder with ALiBi and a tied head, a
QuickGELU open_clip ViT/14 at 224 px, Perceiver, a cross-attention block before every 4th layer,
MMC4 micro-batches of T=256 tokens and M=6 images), narrower and shallower. Measurement: one real
training step (forward, `flamingo_loss`, backward, AdamW step) after a first step has created the
optimizer state, under `LiveTensorBytes`, a dispatch mode that follows every
tensor storage alive on the CPU (parameters, gradients, optimizer state, activations, temporaries)
and reports the peak of their sum.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from megaflamingo.config import Config

SCALED = [
    "model.lm.hf_path=null", "model.lm.family=mpt", "model.lm.hidden_size=256", "model.lm.num_layers=8",
    "model.lm.num_heads=4", "model.lm.intermediate_size=1024", "model.lm.tie_word_embeddings=true",
    "model.lm.vocab_size=8192", "model.vocab_size=8195", "model.eoc_token_id=8192", "model.media_token_id=8193",
    "model.pad_token_id=8194", "model.xattn.heads=8", "model.xattn.dim_head=64",
    "model.perceiver.depth=2", "model.vision.open_clip_model=null",
    "model.vision.open_clip_config={embed_dim: 64, quick_gelu: true, vision_cfg: {image_size: 224, "
    "patch_size: 14, width: 128, layers: 2, head_width: 64, mlp_ratio: 4.0}}",
    "model.kernels.xattn=reference", "train.precision=fp32", "parallel.zero_stage=0",
    "data.laion.shards=null", "data.mmc4.batch_size=2",
]
"""Overrides of configs/openflamingo-9b.yaml: D 4096 -> 256, 32 -> 8 layers, ViT-L (1024 wide,
24 layers) -> 128 wide, 2 layers (same 224 px / 14 px patches: P = 256), Perceiver depth 6 -> 2,
vocabulary 50,280 -> 8,195; cross-attention (8 heads of 64, ff x4), latents (64), T, M unchanged."""


def synthetic_batch(cfg: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """B samples of the MMC4 shape: M `<image>` tokens spread over T, a padded tail on sample 0."""
    m, s = cfg.model, cfg.data.mmc4
    B, T, M = s.batch_size, s.seq_len, s.max_num_media
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.lm.vocab_size, (B, T), generator=gen)
    ids[:, torch.arange(M) * (T // M)] = m.media_token_id
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -T // 8:] = 0
    size = m.vision.open_clip_config["vision_cfg"]["image_size"]
    return {"images": torch.randn(B, M, 1, 3, size, size, generator=gen), "input_ids": ids,
            "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100), "loss_weight": torch.ones(B)}


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of every tensor storage created under the mode and still alive, and their peak.

    Each op's outputs are looked at once per storage (views share theirs; storages of `existing`
    tensors are never counted); a weakref finalizer takes a storage's bytes off when it is freed. Backward ops run through the mode too (the CPU
    autograd engine uses the calling thread).
    """

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.seen, self.live, self.peak = WeakIdKeyDictionary(), 0, 0
        for t in existing:  # views of these (a weight's transpose, ...) allocate nothing
            self.seen[t.untyped_storage()] = True

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.layout == torch.strided:
                storage = t.untyped_storage()
                if storage not in self.seen:
                    self.seen[storage] = True
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def measured_step_peak(cfg: Config) -> dict[str, float]:
    """Peak bytes of one training step of `build_model(cfg.model)`.

    Returns:
        {"peak": parameters + buffers + optimizer state + the peak of everything the step
         allocates, "step": that last part alone (gradients, activations, temporaries),
         "parameters", "buffers", "optimizer"}.
    """
    from megaflamingo.models.flamingo import build_model
    from megaflamingo.training.loss import flamingo_loss

    torch.manual_seed(0)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    model = build_model(cfg.model).to(dtype)  # bf16: the whole module, as DeepSpeed's bf16 mode
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = synthetic_batch(cfg)
    batch["images"] = batch["images"].to(dtype)

    def step() -> None:
        logits = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        loss = flamingo_loss(logits, batch["labels"], batch["loss_weight"])
        del logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates the AdamW state
    params = sum(t.untyped_storage().nbytes() for t in model.parameters())
    buffers = sum(t.untyped_storage().nbytes() for t in model.buffers())
    state = sum(v.untyped_storage().nbytes() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)  # exp_avg, exp_avg_sq (not `step`)
    tensors = [*model.parameters(), *model.buffers(), *batch.values(),
               *(v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))]
    tracker = LiveTensorBytes(tensors)
    with tracker:
        step()
    return {"peak": params + buffers + state + tracker.peak, "step": tracker.peak, "parameters": params,
            "buffers": buffers, "optimizer": state}
