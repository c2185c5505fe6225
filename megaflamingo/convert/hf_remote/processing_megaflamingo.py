"""Processor of an exported megaflamingo model: PIL images + text with `<image>` -> model inputs.

Written by megaflamingo; imports only torch, transformers, numpy and PIL (transformers' own
dependencies). The image transform is open_clip's evaluation transform, which megaflamingo's data
pipeline uses: resize the shortest side (bicubic by default), centre crop, scale to [0, 1],
normalise with the mean / std of preprocessor_config.json, every step in float32 as torchvision
computes it, so the tensors equal the pipeline's bit for bit.

    processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
    batch = processor(images=[[img1, img2], [img3]], text=["<image>a<|endofchunk|><image>b", "<image>c"])
    # batch: input_ids (B, T), attention_mask (B, T), vision_x (B, M, 1, 3, S, S) zero-padded
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature

PREPROCESSOR_FILE = "preprocessor_config.json"
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST}


class MegaFlamingoProcessor:
    """Tokenizer + image transform of an exported model.

    Args:
        tokenizer: the model's tokenizer (with `<image>` and `<|endofchunk|>`).
        image_size: output side S.
        image_mean, image_std: per-channel normalisation.
        interpolation: "bicubic" | "bilinear" | "nearest" for the shortest-side resize.
    """

    def __init__(self, tokenizer, image_size: int, image_mean, image_std, interpolation: str = "bicubic") -> None:
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.interpolation = interpolation

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """AutoProcessor calls this on remote-code processors; the auto_map is written by us."""

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "MegaFlamingoProcessor":
        """Load the tokenizer and preprocessor_config.json of an exported directory."""
        settings = json.loads((Path(path) / PREPROCESSOR_FILE).read_text())
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        return cls(tokenizer, settings["image_size"], settings["image_mean"], settings["image_std"],
                   settings.get("interpolation", "bicubic"))

    def save_pretrained(self, path) -> None:
        """Write the tokenizer files and preprocessor_config.json into `path`."""
        self.tokenizer.save_pretrained(path)
        settings = {"processor_class": type(self).__name__, "image_size": self.image_size,
                    "image_mean": self.image_mean, "image_std": self.image_std,
                    "interpolation": self.interpolation, "resize_mode": "shortest",
                    "auto_map": {"AutoProcessor": "processing_megaflamingo.MegaFlamingoProcessor"}}
        (Path(path) / PREPROCESSOR_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    def _resize_crop(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        w, h = image.size
        side = self.image_size
        if w <= h:  # short side -> S, long side -> int(S * long / short), as torchvision's Resize
            size = (side, int(side * h / w))
        else:
            size = (int(side * w / h), side)
        if size != (w, h):
            image = image.resize(size, _RESAMPLE[self.interpolation])
        w, h = image.size
        top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
        return image.crop((left, top, left + side, top + side))

    def transform(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> (3, S, S) float32."""
        array = np.asarray(self._resize_crop(image), dtype=np.uint8)  # (S, S, 3)
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div(255)
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(-1, 1, 1)
        return pixels.sub(mean).div(std)

    def images_to_vision_x(self, images, batch_size: int) -> torch.Tensor:
        """Per-sample lists of PIL images -> (B, M, 1, 3, S, S), zero-padded to the longest list."""
        if images and isinstance(images[0], Image.Image):
            images = [images] if batch_size == 1 else [[im] for im in images]
        if len(images) != batch_size:
            raise ValueError(f"got image lists for {len(images)} samples and {batch_size} texts")
        M = max(1, max(len(x) for x in images))
        out = torch.zeros(batch_size, M, 1, 3, self.image_size, self.image_size)
        for b, sample in enumerate(images):
            for m, image in enumerate(sample):
                out[b, m, 0] = self.transform(image)
        return out

    def __call__(self, images=None, text=None, return_tensors: str = "pt", **tokenizer_kwargs) -> BatchFeature:
        """Args:
            images: None, a list of PIL images (one per text, or all for one text), or a list of
                per-sample lists.
            text: a string or a list of strings with `<image>` where each image sits.
            **tokenizer_kwargs: passed to the tokenizer (padding="longest" by default).
        Returns:
            BatchFeature with input_ids, attention_mask and (with images) vision_x.
        """
        texts = [text] if isinstance(text, str) else list(text)
        tokenizer_kwargs.setdefault("padding", "longest")
        data = dict(self.tokenizer(texts, return_tensors=return_tensors, **tokenizer_kwargs))
        if images is not None:
            data["vision_x"] = self.images_to_vision_x(images, len(texts))
        return BatchFeature(data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
