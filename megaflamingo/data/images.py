"""Image decoding and the open_clip evaluation transform shared by both training streams.

OpenFlamingo preprocesses every training image with open_clip's *validation* transform (resize the
short side, bicubic; centre crop; to tensor; normalise with the CLIP mean/std), then flips it
horizontally with probability 0.5 (reference §4.1). `ImageTransform` builds that transform with
`open_clip.image_transform` itself and runs it in two stages:

- the PIL stage (resize, crop) per image, exactly as open_clip composes it;
- the tensor stage written straight into the batch tensor: the uint8 pixels converted to float32
  by one strided copy (H, W, 3) -> (3, H, W), then the very float32 operations of torchvision's
  ToTensor + Normalize in place (/255, -mean, /std), so every output element is bitwise identical
  to the open_clip transform, without its intermediate tensors. (A 256-entry lookup table gives
  the same values but gathers from strided pixels: ~2x slower per image in a loader worker.)

A flip mirrors the uint8 pixels before the conversion, which equals flipping the normalised
tensor afterwards (what the reference does).
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import torch
from PIL import Image

from megaflamingo.config import Config
from megaflamingo.data.batching import SkipSample


def decode_image(raw: bytes) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, ...) into an RGB PIL image.

    Args:
        raw: the encoded file.
    Returns:
        The fully loaded RGB image.
    Raises:
        SkipSample("bad_image"): the bytes are not a decodable image (corrupt or truncated).
    """
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise SkipSample("bad_image") from err


def _open_clip_transform(image_size, preprocess: dict):
    import open_clip

    return open_clip.image_transform(
        image_size,
        is_train=False,
        mean=preprocess.get("mean"),
        std=preprocess.get("std"),
        resize_mode=preprocess.get("resize_mode"),
        interpolation=preprocess.get("interpolation"),
    )


class ImageTransform:
    """open_clip's validation transform, applied as a PIL stage plus an in-place tensor stage.

    Args:
        image_size: output side (int) or (H, W).
        preprocess: optional open_clip preprocess settings (mean, std, resize_mode, interpolation);
            missing entries take open_clip's defaults (the OpenAI CLIP mean/std, bicubic, shortest).
    """

    def __init__(self, image_size, preprocess: Optional[dict] = None) -> None:
        import open_clip.transform as oct

        self.compose = _open_clip_transform(image_size, preprocess or {})
        stages = list(self.compose.transforms)
        kinds = [type(s) for s in stages[-3:]]
        if kinds != [oct.MaybeConvertMode, oct.MaybeToTensor, oct.Normalize]:
            raise ValueError(f"unexpected open_clip transform layout: {self.compose}")
        self.pil_stages = stages[:-3]
        # Normalize's own float32 mean / std (it subtracts and divides by these, in this order)
        self.mean = torch.as_tensor(stages[-1].mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.as_tensor(stages[-1].std, dtype=torch.float32).view(3, 1, 1)
        side = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        self.size = (int(side[0]), int(side[1]))

    def pil_stage(self, image: Image.Image) -> Image.Image:
        """Resize and crop as open_clip does; returns an RGB image of exactly `self.size`."""
        from torchvision.transforms import CenterCrop

        for stage in self.pil_stages:
            if isinstance(stage, CenterCrop) and image.size == self.size[::-1]:
                continue  # cropping to the current size copies the same pixels
            image = stage(image)
        return image if image.mode == "RGB" else image.convert("RGB")

    def write(self, image: Image.Image, out: torch.Tensor, flip: bool = False) -> None:
        """Transform one image into `out` (3, H, W) float32, in place.

        Args:
            image: a decoded PIL image.
            out: a contiguous float32 view to fill, shape (3, H, W).
            flip: mirror left-right.
        """
        pixels = torch.from_numpy(np.array(self.pil_stage(image)))  # (H, W, 3) uint8, one copy
        if flip:
            pixels = pixels.flip(1)
        out.copy_(pixels.permute(2, 0, 1))
        out.div_(255).sub_(self.mean).div_(self.std)

    def __call__(self, image: Image.Image, flip: bool = False) -> torch.Tensor:
        """One image -> (3, H, W) float32 tensor."""
        out = torch.empty(3, *self.size, dtype=torch.float32)
        self.write(image, out, flip)
        return out


def vision_image_size(cfg: Config) -> tuple[object, dict]:
    """The image side and open_clip preprocess settings the data must use for this config.

    Args:
        cfg: the run config; `data.image_size` wins, else the vision tower's `vision_cfg.image_size`.
    Returns:
        (image_size, preprocess dict from the tower's open_clip config, possibly empty).
    Raises:
        ValueError: no image size can be determined.
    """
    vision = cfg.model.vision
    model_cfg: dict = {}
    if vision.open_clip_config is not None:
        model_cfg = vision.open_clip_config
    elif vision.open_clip_model is not None:
        import open_clip

        model_cfg = open_clip.get_model_config(vision.open_clip_model) or {}
    preprocess = dict(model_cfg.get("preprocess_cfg") or {})
    size = cfg.data.image_size or (model_cfg.get("vision_cfg") or {}).get("image_size")
    if size is None:
        raise ValueError("data.image_size is not set and the vision tower config has no image_size")
    return size, preprocess


def build_image_transform(cfg: Config) -> ImageTransform:
    """The training image transform for a config (see `vision_image_size`)."""
    size, preprocess = vision_image_size(cfg)
    return ImageTransform(size, preprocess)
