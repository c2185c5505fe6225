"""KV-cached decoding == uncached decoding: same logits (to float tolerance) and the same tokens,
greedy and beam search, with left padding, several images, `<image>` among the generated tokens,
and for LLaMA (RoPE, GQA) and MPT (ALiBi)."""

from __future__ import annotations

import pytest
import torch

from megaflamingo.eval.cache import CachedDecoder
from megaflamingo.eval.generation import UncachedDecoder, beam_search, greedy_search, rank_classes
from tests.eval.test_generation import left_padded_batch
from tests.models.test_flamingo import EOC, MEDIA, tiny_config


def build(family: str):
    from megaflamingo.models.flamingo import Flamingo, build_model

    torch.manual_seed(0)
    kwargs = {"num_kv_heads": 2} if family == "llama" else {}
    model = build_model(tiny_config(family, **kwargs)).eval()
    assert isinstance(model, Flamingo)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.fill_(1.0)
    return model


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_cached_logits_equal_uncached(family):
    model = build(family)
    images, ids, mask = left_padded_batch()
    cached, plain = CachedDecoder(model), UncachedDecoder(model)
    with torch.no_grad():
        a, sa = cached.start(images, ids, mask)
        b, sb = plain.start(images, ids, mask)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        steps = torch.tensor([[5, 9], [MEDIA, 7], [11, 3]])  # an <image> token mid-way: media index moves on
        for tokens in steps:
            rows = torch.tensor([1, 0])  # reorder rows (beam search does)
            sa, sb = cached.select(sa, rows), plain.select(sb, rows)
            a, sa = cached.extend(sa, tokens[:, None])
            b, sb = plain.extend(sb, tokens[:, None])
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        a, _ = cached.extend(sa, torch.tensor([[4, 8, 2], [1, 2, 3]]))  # several tokens at once
        b, _ = plain.extend(sb, torch.tensor([[4, 8, 2], [1, 2, 3]]))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_cached_generation_equals_uncached(family):
    model = build(family)
    images, ids, mask = left_padded_batch()
    for decode in (lambda d: greedy_search(d, images, ids, mask, 8, EOC),
                   lambda d: beam_search(d, images, ids, mask, 8, EOC, num_beams=3),
                   lambda d: rank_classes(d, images, ids, mask, [[17], [30, 41, 9]]).tolist()):
        want = decode(UncachedDecoder(model))
        got = decode(CachedDecoder(model))
        if isinstance(want[0][0], float):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
        else:
            assert got == want and sum(map(len, got)) > 4
