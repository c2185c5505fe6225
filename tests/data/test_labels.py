"""Text construction and label masks on fixed strings (reference §4.1, §4.2)."""

from __future__ import annotations

import random

import torch

from megaflamingo.data.batching import TextEncoder
from megaflamingo.data.laion import laion_labels, laion_text
from megaflamingo.data.mmc4 import interleaved_text, mmc4_labels
from megaflamingo.data.tokenizer import FlamingoTokens

T = FlamingoTokens(media_token_id=9, eoc_token_id=8, pad_token_id=0, eos_token_id=7, vocab_size=10)


def test_laion_masks_pad_and_media_only():
    ids = torch.tensor([[9, 1, 2, 8, 7, 0, 0]])
    assert laion_labels(ids, T).tolist() == [[-100, 1, 2, 8, 7, -100, -100]]
    assert laion_text("  a red circle \n", "</s>") == "<image>a red circle<|endofchunk|></s>"


def test_mmc4_masks_before_first_image_and_between_chunks():
    #       text  img  a  b  eoc  c  d  img  e  eoc  eos pad
    ids = torch.tensor([[3, 9, 1, 2, 8, 4, 5, 9, 6, 8, 7, 0]])
    want = [-100, -100, 1, 2, 8, -100, -100, -100, 6, 8, -100, -100]
    assert mmc4_labels(ids, T).tolist() == [want]
    # two chunks in a row (argmax: two images on one sentence) and no image at all
    ids = torch.tensor([[9, 8, 9, 1, 8, 8, 2], [1, 2, 8, 3, 4, 5, 6]])
    assert mmc4_labels(ids, T).tolist() == [[-100, 8, -100, 1, 8, -100, -100], [-100] * 7]


def test_mmc4_labels_equal_the_reference_loop_on_random_ids():
    rng = random.Random(0)
    ids = torch.tensor([[rng.choice([0, 1, 2, 3, 7, 8, 9, 9]) for _ in range(40)] for _ in range(64)])
    labels = ids.clone()
    labels[labels == T.pad_token_id] = -100
    for row in labels:  # the reference's own rules, written as its loops (train_utils.py)
        i = 0
        while i < len(row) and row[i] != T.media_token_id:
            row[i], i = -100, i + 1
        for e in torch.where(row == T.eoc_token_id)[0].tolist():
            j = e + 1
            while j < len(row) and row[j] != T.media_token_id:
                row[j], j = -100, j + 1
    labels[labels == T.media_token_id] = -100
    assert torch.equal(mmc4_labels(ids, T), labels)


def test_interleaved_text_follows_the_reference_rule():
    sentences = ["Intro here.", "A red circle.", "Filler.", "A blue square."]
    text = interleaved_text(sentences, [1, 3], "</s>")
    assert text == "Intro here.<image>A red circle. Filler.<|endofchunk|><image>A blue square.<|endofchunk|></s>"
    assert interleaved_text(["One.", "Two."], [1, 1], "") == \
        "One.<image><|endofchunk|><image>Two.<|endofchunk|>"


def test_text_encoder_equals_the_tokenizer_call(tokenizer):
    encoder = TextEncoder(tokenizer, 16)
    for text in ["<image>a blue circle<|endofchunk|><|endoftext|>", "x" * 40, "", "é ü 0123"]:
        ids, mask = encoder(text)
        ref = tokenizer(text, max_length=16, truncation=True, padding="max_length",
                        padding_side="right")
        assert ids.tolist() == ref["input_ids"] and mask.tolist() == ref["attention_mask"]


def test_text_encoder_matches_when_the_tokenizer_adds_a_bos(tokenizer_dir):
    from tokenizers import processors

    from megaflamingo.data.tokenizer import load_tokenizer

    tok, _ = load_tokenizer(tokenizer_dir)  # a private instance: the post-processor changes
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    encoder = TextEncoder(tok, 8)
    for text in ["<image>a blue circle<|endofchunk|>", "x" * 30, "ab"]:
        ids, _ = encoder(text)
        ref = tok(text, max_length=8, truncation=True, padding="max_length", padding_side="right")
        assert ids.tolist() == ref["input_ids"] and ids[0] == bos
