"""Generation loops: beam search == transformers' own beam search, greedy == the full-forward argmax,
class ranking == log-probs of the whole sequence, left padding changes nothing."""

from __future__ import annotations

import pytest
import torch

from megaflamingo.eval.generation import UncachedDecoder, beam_search, greedy_search, rank_classes
from tests.models.test_flamingo import EOC, MEDIA, tiny_config


class HFDecoder:
    """The Decoder interface over a transformers causal LM (no padding: all prompts one length)."""

    def __init__(self, model) -> None:
        self.model = model

    def start(self, vision_x, input_ids, attention_mask):
        return self.model(input_ids=input_ids).logits[:, -1].float(), input_ids

    def extend(self, state, tokens):
        ids = torch.cat([state, tokens], dim=1)
        return self.model(input_ids=ids).logits[:, -tokens.shape[1]:].float(), ids

    def select(self, state, rows):
        return state[rows]


def tiny_hf_llama(seed: int, vocab: int = 40):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # peaky distributions: eos is hit early and often
    return model


@pytest.mark.parametrize("num_beams,length_penalty", [(3, 0.0), (2, 1.0), (4, -2.0)])
def test_beam_search_equals_transformers_generate(num_beams, length_penalty):
    hits = 0
    for seed in range(6):
        model = tiny_hf_llama(seed)
        eos = seed % 7
        prompts = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(seed))
        want = model.generate(prompts, attention_mask=torch.ones_like(prompts), num_beams=num_beams,
                              length_penalty=length_penalty, max_new_tokens=6, eos_token_id=eos,
                              pad_token_id=eos, do_sample=False, early_stopping=False)[:, 5:]
        got = beam_search(HFDecoder(model), torch.zeros(3, 1), prompts, torch.ones_like(prompts),
                          max_new_tokens=6, eos_token_id=eos, num_beams=num_beams,
                          length_penalty=length_penalty)
        for row, tokens in enumerate(got):
            expected = want[row].tolist()
            if eos in expected:
                expected = expected[:expected.index(eos) + 1]
                hits += 1
            assert tokens == expected, (seed, row)
    assert hits > 0  # some rows really stopped at eos


def test_greedy_equals_transformers_greedy():
    model = tiny_hf_llama(3)
    prompts = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(0))
    want = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=7, do_sample=False,
                          eos_token_id=5, pad_token_id=5)[:, 6:]
    got = greedy_search(HFDecoder(model), torch.zeros(4, 1), prompts, torch.ones_like(prompts), 7, 5)
    for row, tokens in enumerate(got):
        expected = want[row].tolist()
        expected = expected[:expected.index(5) + 1] if 5 in expected else expected
        assert tokens == expected


def build_tiny():
    from megaflamingo.models.flamingo import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    with torch.no_grad():  # open the gates so that the images matter
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.fill_(1.0)
    return model


def left_padded_batch():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 2, 1, 3, 32, 32, generator=gen)
    ids = torch.randint(0, 240, (2, 9), generator=gen)
    ids[:, 0], ids[:, 5] = MEDIA, MEDIA
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # row 1: a shorter prompt, left-padded
    ids[1, 3] = MEDIA
    return images, ids, mask


def test_flamingo_generation_is_independent_of_left_padding_and_batching():
    model = build_tiny()
    images, ids, mask = left_padded_batch()
    dec = UncachedDecoder(model)
    batched = [beam_search(dec, images, ids, mask, 5, EOC, num_beams=3),
               greedy_search(dec, images, ids, mask, 5, EOC)]
    for row, start in ((0, 0), (1, 3)):
        one = (images[row:row + 1], ids[row:row + 1, start:], mask[row:row + 1, start:])
        assert beam_search(dec, *one, 5, EOC, num_beams=3) == [batched[0][row]]
        assert greedy_search(dec, *one, 5, EOC) == [batched[1][row]]


def test_rank_classes_equals_full_sequence_log_probs():
    model = build_tiny()
    images, ids, mask = left_padded_batch()
    classes = [[17], [30, 41, 9], [200, 3]]
    got = rank_classes(UncachedDecoder(model), images, ids, mask, classes, normalize_length=True)
    for row, start in ((0, 0), (1, 3)):
        for c, tokens in enumerate(classes):
            seq = torch.cat([ids[row, start:], torch.tensor(tokens)])[None]
            logp = torch.log_softmax(model(images[row:row + 1], seq)[0].float(), -1)
            n = len(tokens)
            want = torch.stack([logp[-n - 1 + k, t] for k, t in enumerate(tokens)]).mean()
            torch.testing.assert_close(got[row, c], want, rtol=1e-5, atol=1e-5)
