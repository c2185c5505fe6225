"""Helpers for the data tests: configs and shims that let open_flamingo 2.0.1's own data code run.

The shims exist only here (never in the package). They bridge what changed since 2023 and what
the reference randomises, nothing else:
- `import open_flamingo.train.data` needs its train/ folder on sys.path; train_utils imports wandb;
- under transformers 5 tokenizers have no `additional_special_tokens(_ids)`: a proxy supplies them;
- the reference's flip (torchvision RandomHorizontalFlip) and single-image coin (random.random)
  are replaced by the coins our per-sample RNG drew, so both sides see the same randomness.
"""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

from megaflamingo.config import config_from_dict
from megaflamingo.data.tokenizer import EOC_TOKEN, MEDIA_TOKEN
from tests.assets import TINY_VISION


def make_config(tokenizer_dir: Path, data: dict, vision: dict | None = None):
    """A Config with a tiny vision tower (32 px) and the given data section."""
    model = {"vision": vision or {"open_clip_config": TINY_VISION}, "tokenizer": str(tokenizer_dir)}
    return config_from_dict({"model": model, "data": data})


def stream(shards: str, **kw) -> dict:
    """A full stream section (partial sections lose the dataclass factory's defaults)."""
    base = {"shards": shards, "batch_size": 4, "seq_len": 32, "max_num_media": 1,
            "loss_multiplier": 1.0}
    base.update(kw)
    return base


def load_reference():
    """(open_flamingo.train.data, open_flamingo.train.train_utils) as installed."""
    import open_flamingo

    train_dir = str(Path(open_flamingo.__file__).parent / "train")
    if train_dir not in sys.path:
        sys.path.insert(0, train_dir)
    # train_utils imports wandb at the top: a stub only for that import, then gone again (left in
    # sys.modules, its missing __spec__ makes transformers' later find_spec("wandb") raise)
    stub = "wandb" not in sys.modules
    if stub:
        sys.modules["wandb"] = types.ModuleType("wandb")
    try:
        import data as ref_data  # noqa: the reference's own module name
        import train_utils as ref_train
    finally:
        if stub:
            del sys.modules["wandb"]
    return ref_data, ref_train


class RefTokenizer:
    """The tokenizer as the 2023 reference expects it (transformers 4 attribute names)."""

    def __init__(self, tokenizer) -> None:
        object.__setattr__(self, "_tok", tokenizer)
        names = [EOC_TOKEN, MEDIA_TOKEN]
        object.__setattr__(self, "additional_special_tokens", names)
        object.__setattr__(self, "additional_special_tokens_ids",
                           [tokenizer.convert_tokens_to_ids(n) for n in names])

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __setattr__(self, name, value):
        setattr(self._tok, name, value)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)


@contextlib.contextmanager
def reference_coins(ref_data, flip: bool, keep_u: float = 1.0):
    """Make the reference flip iff `flip` and draw `keep_u` for its single-image coin."""

    class Flip:
        def __init__(self, p):
            pass

        def __call__(self, images):
            return images.flip(-1) if flip else images

    saved = ref_data.torchvision, ref_data.random
    ref_data.torchvision = SimpleNamespace(transforms=SimpleNamespace(RandomHorizontalFlip=Flip))
    ref_data.random = SimpleNamespace(random=lambda: keep_u)
    try:
        yield
    finally:
        ref_data.torchvision, ref_data.random = saved


class _CaptureModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.labels = []

    def forward(self, vision_x, lang_x, attention_mask, labels):
        self.labels.append(labels.clone())
        return (self.weight.sum() * 0,)


def reference_labels(ref_train, tokenizer, laion_ids: torch.Tensor, mmc4_ids: torch.Tensor):
    """Labels computed by the reference's own `train_one_epoch` for one LAION and one MMC4 batch.

    A stand-in model records the labels it is given; optimizer and scheduler do nothing.
    """
    model = _CaptureModel()
    args = SimpleNamespace(num_epochs=1, precision="fp32", fsdp=False, rank=0, world_size=1,
                           gradient_accumulation_steps=1, loss_multiplier_laion=1.0,
                           loss_multiplier_mmc4=1.0, freeze_lm_embeddings=True,
                           report_to_wandb=False, logging_steps=10**9,
                           batch_size_laion=len(laion_ids), batch_size_mmc4=len(mmc4_ids))
    laion_batch = (torch.zeros(len(laion_ids), 3, 2, 2), (laion_ids, torch.ones_like(laion_ids)))
    mmc4_batch = (torch.zeros(len(mmc4_ids), 1, 3, 2, 2),
                  [(row[None], torch.ones_like(row)[None]) for row in mmc4_ids])
    loaders = [_OneBatch(laion_batch), _OneBatch(mmc4_batch)]
    noop = SimpleNamespace(step=lambda: None, zero_grad=lambda set_to_none=True: None,
                           param_groups=[{"lr": 0.0}])
    ref_train.train_one_epoch(args, model, 0, loaders[0], loaders[1], tokenizer, noop, noop,
                              "cpu", None)
    return model.labels[0], model.labels[1]


class _OneBatch:
    num_batches = 1

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        return iter([self.batch])
