"""Shared fixtures for the data tests: an offline tokenizer and easy-vqa shards written by the CLI."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from megaflamingo.data.tokenizer import load_tokenizer
from tests.assets import make_bpe_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_bpe_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    tok, _ = load_tokenizer(tokenizer_dir)
    return tok


@pytest.fixture(scope="session")
def easy_vqa_dir(tmp_path_factory) -> Path:
    """launcher/prepare_data.py easy-vqa, run in-process: 240 train/test images, 20 per shard."""
    out = tmp_path_factory.mktemp("easy_vqa")
    argv = sys.argv
    sys.argv = ["prepare_data.py", "easy-vqa", "--out", str(out), "--limit", "240",
                "--shard-size", "20"]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(REPO / "launcher" / "prepare_data.py"), run_name="__main__")
        assert done.value.code == 0
    finally:
        sys.argv = argv
    return out
