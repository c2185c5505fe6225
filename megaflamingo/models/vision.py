"""The frozen open_clip vision tower and the patch tokens the Perceiver reads.

Shapes: B batch, M media per sample, F frames (= 1), C channels, S image side,
P patch tokens per image (CLS excluded), Dv vision width.

The released OpenFlamingo models saw the ViT's patch tokens *before* `ln_post` (open_clip <= 2.22);
open_clip >= 2.23 applies `ln_post` to all tokens by default (reference §0.1). We therefore compute
the tokens ourselves from the tower's submodules, so no open_clip version or flag can change them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from megaflamingo.config import VisionConfig


def _open_clip_config(cfg: VisionConfig) -> dict:
    import open_clip

    if cfg.open_clip_config is not None:
        return cfg.open_clip_config
    model_cfg = open_clip.get_model_config(cfg.open_clip_model)
    if model_cfg is None:
        raise ValueError(f"model.vision.open_clip_model: unknown open_clip model '{cfg.open_clip_model}'")
    return model_cfg


def _visual_state_dict(path: str) -> dict:
    """Read a local open_clip checkpoint (whole CLIP or just `visual`) as the tower's state dict."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return state


class VisionEncoder(nn.Module):
    """A frozen open_clip VisionTransformer that returns pre-`ln_post` patch tokens.

    Args:
        cfg: which tower (a named open_clip model or an inline config) and its local weights.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        model_cfg = _open_clip_config(cfg)
        vision_cfg = CLIPVisionCfg(**model_cfg["vision_cfg"])
        self.visual = _build_vision_tower(
            model_cfg["embed_dim"], vision_cfg, quick_gelu=model_cfg.get("quick_gelu", False)
        )
        self.width = vision_cfg.width
        self.image_size = vision_cfg.image_size if isinstance(vision_cfg.image_size, int) else vision_cfg.image_size[0]
        if cfg.weights is not None:
            self.visual.load_state_dict(_visual_state_dict(cfg.weights))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VisionEncoder":
        # Frozen: always in eval mode (no patch dropout), whatever the parent does.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens without CLS, before `ln_post`.

        Args:
            images: (B*M, C, S, S) preprocessed images.
        Returns:
            (B*M, P, Dv) tokens.
        """
        v = self.visual
        x = v.conv1(images)  # (BM, Dv, g, g)
        x = x.flatten(2).transpose(1, 2)  # (BM, P, Dv)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (BM, 1+P, Dv)
        x = v.ln_pre(x)
        x = v.transformer(x)
        return x[:, 1:]
