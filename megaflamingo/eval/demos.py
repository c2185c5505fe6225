"""Which items are scored, and which demonstrations each one gets: random or RICES.

Scored items and the random query set follow OpenFlamingo's draws exactly for a given seed:
`np.random.seed(seed)`, then `choice(len(test), num_samples, replace=False)`, then
`choice(len(train), query_set_size, replace=False)` (one RandomState stream, in that order).

Deliberate differences from OpenFlamingo:
- Random demos: item p (its position in the scored order) draws `k` of the query set with
  `random.Random(seed * 1_000_003 + p)`. OpenFlamingo draws per batch from a generator seeded with
  `seed + rank`, so its demos change with the number of ranks and the batch size; ours do not.
- The query set is clamped to the training-set size (OpenFlamingo's `choice` raises instead).
- RICES features come from the model's own frozen vision tower (its patch tokens, mean-pooled and
  L2-normalised) instead of a separate CLIP model (no CLIP weights offline); they are cached on
  disk keyed by a hash of the tower's weights, the image size and the image list. The top-k by
  cosine similarity are used with the most similar demo placed last, as OpenFlamingo does.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from megaflamingo.eval.tasks import Example


def sample_order(num_test: int, num_samples: int, num_train: int, query_set_size: int,
                 seed: int) -> tuple[list[int], list[int]]:
    """(scored test indices in order, query-set train indices), OpenFlamingo's draws.

    Args:
        num_samples: items to score; <= 0 or more than the test set means all of them.
    """
    rng = np.random.RandomState(seed)
    n = num_test if num_samples <= 0 else min(num_samples, num_test)
    test = rng.choice(num_test, n, replace=False).tolist()
    query = rng.choice(num_train, min(query_set_size, num_train), replace=False).tolist() if num_train else []
    return test, query


def random_demos(query_set: Sequence[int], k: int, seed: int, position: int) -> list[int]:
    """k distinct query-set indices for the item at `position` (independent of ranks and batches)."""
    if k > len(query_set):
        raise ValueError(f"{k} demonstrations asked for but the query set has {len(query_set)} items")
    return random.Random(seed * 1_000_003 + position).sample(list(query_set), k)


@torch.no_grad()
def image_features(model, images: torch.Tensor) -> torch.Tensor:
    """RICES features: the frozen tower's patch tokens, mean-pooled, L2-normalised.

    Args:
        model: a Flamingo (its `vision` tower maps (B, C, S, S) to (B, P, Dv) tokens).
        images: (B, C, S, S) transformed images.
    Returns:
        (B, Dv) unit vectors (float32, on the CPU).
    """
    feats = model.vision(images).float().mean(dim=1)  # (B, Dv)
    return torch.nn.functional.normalize(feats, dim=-1).cpu()


def _fingerprint(model, examples: Sequence[Example], image_size: int) -> str:
    digest = hashlib.sha1(str(image_size).encode())
    for name, tensor in sorted(model.vision.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    for ex in examples:
        digest.update(str(ex.image).encode())
    return digest.hexdigest()[:16]


class Rices:
    """Retrieval-based in-context example selection over a demonstration pool.

    Args:
        model: the Flamingo whose vision tower gives the features.
        pool: the demonstration candidates.
        load_images: list of examples -> (B, C, S, S) transformed images (on the model's device).
        cache_dir: where features are cached (`rices-<task>-<fingerprint>.pt`); None: no cache.
        task: the task name (part of the cache file name).
        batch_size: images per forward when computing the pool's features.
    """

    def __init__(self, model, pool: Sequence[Example], load_images: Callable, cache_dir: Path | None,
                 task: str, batch_size: int = 32) -> None:
        self.model, self.load_images = model, load_images
        size = int(getattr(model.vision, "image_size", 0))
        path = None
        if cache_dir is not None:
            path = Path(cache_dir) / f"rices-{task}-{_fingerprint(model, pool, size)}.pt"
        if path is not None and path.is_file():
            self.features = torch.load(path)
        else:
            chunks = [image_features(model, load_images(pool[i:i + batch_size]))
                      for i in range(0, len(pool), batch_size)]
            self.features = torch.cat(chunks) if chunks else torch.zeros(0, 1)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks may race: last rename wins
                torch.save(self.features, tmp)
                tmp.replace(path)

    def find(self, items: Sequence[Example], k: int) -> list[list[int]]:
        """Per item, the pool indices of its k most similar demos, the most similar last."""
        query = image_features(self.model, self.load_images(items))  # (B, Dv)
        sims = query @ self.features.T  # (B, pool)
        top = sims.topk(k, dim=1).indices  # most similar first
        return [list(reversed(row)) for row in top.tolist()]
