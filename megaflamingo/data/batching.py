"""One micro-batch format for both training streams, and the fixed-length text encoder.

A micro-batch is a dict of tensors whose shapes are fixed per stream (pipeline stages need them):

    images          (B, M, 1, 3, H, W) float32   zero-padded to M = max_num_media
    input_ids       (B, T) int64                 right-padded with the pad id to T = seq_len
    attention_mask  (B, T) int64
    labels          (B, T) int64                 -100 where no loss is taken
    loss_weight     (B,)   float32               the stream's loss multiplier

Preprocessing (laion.py, mmc4.py) turns one raw sample into a `Sample` (decoded images, flip
coin, token ids, labels) or raises `SkipSample(reason)`; `collate` writes a list of samples into
one micro-batch, running the image transform straight into the batch tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info


class SkipSample(Exception):
    """A sample (or one image of it) is unusable; `reason` is the key it is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Sample:
    """One preprocessed training sample, before image transform and collation."""

    images: list[Image.Image]
    """Decoded images in `<image>`-token order (at most max_num_media)."""
    flip: bool
    """Mirror every image of this sample (one coin per sample)."""
    input_ids: torch.Tensor
    """(T,) int64."""
    attention_mask: torch.Tensor
    """(T,) int64."""
    labels: torch.Tensor
    """(T,) int64, -100 = ignored."""


class TextEncoder:
    """Tokenise one string to exactly `seq_len` ids: right padding, right truncation.

    Gives the same ids as `tokenizer(text, max_length=seq_len, truncation=True,
    padding="max_length")` with padding_side="right" (what OpenFlamingo calls). For a Rust-backed
    tokenizer it drives a private copy of the backend directly, configured as transformers
    configures it for that call, which skips ~200 us of Python overhead per call.

    Args:
        tokenizer: a Hugging Face tokenizer that already has the Flamingo tokens.
        seq_len: T.
    """

    def __init__(self, tokenizer, seq_len: int) -> None:
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.backend = self._private_backend(tokenizer, seq_len)

    @staticmethod
    def _private_backend(tokenizer, seq_len: int):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(backend.to_str())
        copy.enable_truncation(seq_len, stride=0, strategy="longest_first",
                               direction=getattr(tokenizer, "truncation_side", "right"))
        copy.enable_padding(length=seq_len, direction="right", pad_id=tokenizer.pad_token_id,
                            pad_token=tokenizer.pad_token,
                            pad_type_id=getattr(tokenizer, "pad_token_type_id", 0))
        copy.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        return copy

    def __call__(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (input_ids (T,) int64, attention_mask (T,) int64)."""
        if self.backend is not None:
            enc = self.backend.encode(text, add_special_tokens=True)
            return (torch.from_numpy(np.array(enc.ids, dtype=np.int64)),
                    torch.from_numpy(np.array(enc.attention_mask, dtype=np.int64)))
        out = self.tokenizer(text, max_length=self.seq_len, truncation=True, padding="max_length",
                             padding_side="right")
        return (torch.tensor(out["input_ids"], dtype=torch.long),
                torch.tensor(out["attention_mask"], dtype=torch.long))


def _batch_buffer(shape: tuple) -> torch.Tensor:
    """An uninitialised float32 tensor; in a DataLoader worker, allocated in shared memory.

    Worker results travel to the main process through shared memory; a tensor already there is
    not copied again (torch's default_collate does the same, with the same storage call).
    """
    if get_worker_info() is None:
        return torch.empty(shape)
    numel = 1
    for size in shape:
        numel *= size
    storage = torch.empty(0)._typed_storage()._new_shared(numel)
    return torch.empty(0).new(storage).view(shape)


def collate(samples: list[Sample], transform, max_num_media: int, loss_weight: float,
            images_out: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Stack samples into one micro-batch (see the module docstring for the format).

    Args:
        samples: B preprocessed samples, each with at most max_num_media images.
        transform: an `ImageTransform` (images are transformed here, into the batch tensor).
        max_num_media: M.
        loss_weight: the stream's loss multiplier, repeated per sample.
        images_out: a (B, M, 1, 3, H, W) float32 tensor to write the images into (default: a new
            one, in shared memory inside a DataLoader worker).
    Returns:
        The micro-batch dict.
    """
    height, width = transform.size
    shape = (len(samples), max_num_media, 1, 3, height, width)
    images = _batch_buffer(shape) if images_out is None else images_out  # (B, M, 1, 3, H, W)
    if tuple(images.shape) != shape:
        raise ValueError(f"collate: images_out has shape {tuple(images.shape)}, expected {shape}")
    for b, sample in enumerate(samples):
        assert len(sample.images) <= max_num_media
        for m, image in enumerate(sample.images):
            transform.write(image, images[b, m, 0], flip=sample.flip)
        images[b, len(sample.images):].zero_()
    return {
        "images": images,
        "input_ids": torch.stack([s.input_ids for s in samples]),
        "attention_mask": torch.stack([s.attention_mask for s in samples]),
        "labels": torch.stack([s.labels for s in samples]),
        "loss_weight": torch.full((len(samples),), float(loss_weight)),
    }
