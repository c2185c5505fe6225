"""LAION-style image-text pairs: one raw webdataset sample -> one training `Sample`.

Shards are img2dataset tars: `{key}.jpg|png|jpeg` + `{key}.txt` (+ an ignored `{key}.json`).
The rules follow OpenFlamingo (reference §4.1, §4.2):

- the image is the first of jpg, png, jpeg present; text is `<image>{caption.strip()}<|endofchunk|>{eos}`,
  right-padded and truncated to seq_len (so EOC/EOS can be cut, as in the reference);
- labels: pad -> -100 and `<image>` -> -100; EOC and EOS stay targets (unless pad == eos). The
  reference's line meant to mask EOS compares a tensor with a string and does nothing; its HEAD
  removed it, so EOS being a target is the intended behaviour and we keep it.

Deliberate differences (each also listed in docs/tests):
- an empty or whitespace-only caption is skipped (counted "empty_text"); the reference keeps it;
- a caption containing a literal `<image>` / `<|endofchunk|>` is skipped ("special_token_in_text");
  the reference would turn it into a media / chunk token;
- the flip coin is drawn per sample from the sample's own RNG; the reference flips a whole batch
  with one coin.
"""

from __future__ import annotations

import random

import torch

from megaflamingo.data.batching import Sample, SkipSample, TextEncoder
from megaflamingo.data.images import decode_image
from megaflamingo.data.tokenizer import EOC_TOKEN, MEDIA_TOKEN, FlamingoTokens

IMAGE_EXTENSIONS = ("jpg", "png", "jpeg")


def laion_text(caption: str, eos_token: str | None) -> str:
    """The training string for one caption (reference `preprocess_laion_text`)."""
    return f"{MEDIA_TOKEN}{caption.strip()}{EOC_TOKEN}{eos_token or ''}"


def laion_labels(input_ids: torch.Tensor, tokens: FlamingoTokens) -> torch.Tensor:
    """LAION targets: a copy of the ids with pad and `<image>` set to -100.

    Args:
        input_ids: (..., T) int64.
        tokens: the Flamingo token ids.
    Returns:
        labels, same shape.
    """
    masked = (input_ids == tokens.pad_token_id) | (input_ids == tokens.media_token_id)
    return input_ids.masked_fill(masked, -100)


def read_caption(fields: dict) -> str:
    """The stripped caption of a raw sample.

    Raises:
        SkipSample: "missing_key" (no .txt), "bad_text" (not UTF-8), "empty_text",
            "special_token_in_text".
    """
    if "txt" not in fields:
        raise SkipSample("missing_key")
    try:
        caption = fields["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SkipSample("bad_text") from None
    if not caption:
        raise SkipSample("empty_text")
    if MEDIA_TOKEN in caption or EOC_TOKEN in caption:
        raise SkipSample("special_token_in_text")
    return caption


def image_bytes(fields: dict) -> bytes:
    """The encoded image of a raw sample (first of jpg, png, jpeg). Raises SkipSample("missing_key")."""
    for ext in IMAGE_EXTENSIONS:
        if ext in fields:
            return fields[ext]
    raise SkipSample("missing_key")


def preprocess_laion(fields: dict, encoder: TextEncoder, tokens: FlamingoTokens,
                     eos_token: str | None, rng: random.Random) -> Sample:
    """One LAION pair -> `Sample` (the image is decoded; transform and flip happen at collation).

    Args:
        fields: raw webdataset sample, extension -> bytes.
        encoder: fixed-length tokeniser (seq_len of the stream).
        tokens: the Flamingo token ids.
        eos_token: the tokenizer's EOS string (None: nothing appended).
        rng: this sample's own RNG; draws: flip.
    Returns:
        The sample.
    Raises:
        SkipSample: missing_key, bad_text, empty_text, special_token_in_text, bad_image.
    """
    flip = rng.random() < 0.5
    caption = read_caption(fields)
    image = decode_image(image_bytes(fields))
    input_ids, attention_mask = encoder(laion_text(caption, eos_token))
    return Sample(images=[image], flip=flip, input_ids=input_ids,
                  attention_mask=attention_mask, labels=laion_labels(input_ids, tokens))
