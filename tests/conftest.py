"""Suite-wide settings: offline, CPU-friendly environment, and the `gpu` marker's skip rule."""

from __future__ import annotations

import os

# Before anything imports transformers / deepspeed: no hub retries, CPU accelerator, one thread per rank.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
