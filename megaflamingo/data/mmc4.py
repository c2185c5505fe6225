"""MMC4-style interleaved documents: one raw webdataset sample -> one training `Sample`.

A shard sample is a single `{key}.json` in OpenFlamingo's converted format: `text_list`
(sentences), `similarity_matrix` (images x sentences) and `image_info[i].image_base64`; or a
ChatGPT-generated document (`is_gpt`, `example` text with `_!_IMAGEk_!_` markers, `image_map`).
The rules follow OpenFlamingo (reference §4.1, §4.2):

1. images without base64 or smaller than `min_image_bytes` (11,000: the reference's
   `len // 1000 <= 10`) are dropped;
2. images are matched to sentences one-to-one (Hungarian on -similarity, the default, HEAD) or by
   per-image argmax (what the released models used); pairs below `sim_threshold` are dropped;
3. the first `max_num_media` matched images in image order are kept;
4. each matched sentence is prefixed with `<|endofchunk|><image>`, sentences are joined with
   spaces, the first `<|endofchunk|>` is removed, spaces around the special tokens are removed,
   and `<|endofchunk|>{eos}` is appended; then right padding / truncation to seq_len;
5. a document with fewer `<image>` tokens than `min_num_images` is rejected, a single-image one is
   kept with probability `single_image_keep_prob`, a single-image one whose `<image>` is the last
   token is rejected;
6. labels: -100 for pad, everything before the first `<image>`, everything after an
   `<|endofchunk|>` up to the next `<image>`, and `<image>` itself.

Deliberate differences from the reference (reference §4.7; each also listed in docs/tests):
- images are put in the order of the sentences they were matched to, so the k-th `<image>` token
  sees the k-th image (the reference keeps image order and mispairs non-monotone matches);
- images whose `<image>` token was truncated away are dropped (the reference keeps them);
- an undecodable image or invalid base64 drops that image, counted, not the whole document;
- a sentence containing a literal `<image>` / `<|endofchunk|>` skips the document;
- `is_gpt`: images follow the order of the markers in the text, truncation keeps max_num_media
  images and tokens (the reference keeps 6 tensors, 5 tokens and a doubled `<|endofchunk|>`), and
  padding uses the configured image size (the reference hard-codes 224);
- the flip and keep coins come from the document's own RNG (one flip coin per document, as in
  the reference).
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

from megaflamingo.config import MMC4Options
from megaflamingo.data.batching import Sample, SkipSample, TextEncoder
from megaflamingo.data.images import decode_image
from megaflamingo.data.shards import write_shards
from megaflamingo.data.tokenizer import EOC_TOKEN, MEDIA_TOKEN, FlamingoTokens

GPT_MARKER = re.compile(r"_!_IMAGE\d+_!_")


# ----------------------------------------------------------------------------- labels


def mmc4_labels(input_ids: torch.Tensor, tokens: FlamingoTokens) -> torch.Tensor:
    """MMC4 targets (reference `train_one_epoch`), vectorised over the last dim.

    Args:
        input_ids: (..., T) int64.
        tokens: the Flamingo token ids.
    Returns:
        labels, same shape: -100 at pad, before the first `<image>`, after an `<|endofchunk|>`
        until the next `<image>`, and at `<image>`.
    """
    ids = input_ids
    pos = torch.arange(ids.shape[-1]).expand_as(ids)
    is_media = ids == tokens.media_token_id
    minus = torch.full_like(pos, -1)
    last_media = torch.where(is_media, pos, minus).cummax(-1).values  # last <image> at or before t
    last_eoc = torch.where(ids == tokens.eoc_token_id, pos, minus).cummax(-1).values
    last_eoc_before = torch.cat([minus[..., :1], last_eoc[..., :-1]], dim=-1)  # strictly before t
    masked = (last_media < 0) | (last_eoc_before > last_media) | is_media
    masked |= ids == tokens.pad_token_id
    return ids.masked_fill(masked, -100)


# ----------------------------------------------------------------------------- text


def clean_special_spacing(text: str) -> str:
    """Remove the spaces OpenFlamingo removes around `<|endofchunk|>` and `<image>`."""
    text = text.replace(" " + EOC_TOKEN, EOC_TOKEN)
    return text.replace(MEDIA_TOKEN + " ", MEDIA_TOKEN).replace(" " + MEDIA_TOKEN, MEDIA_TOKEN)


def interleaved_text(sentences: list[str], matched: list[int], eos_token: Optional[str]) -> str:
    """Build the training string from sentences and the sentence index of each kept image.

    Args:
        sentences: the document's text_list.
        matched: sentence index per kept image (a sentence may appear twice under argmax).
        eos_token: appended after the final `<|endofchunk|>`.
    Returns:
        The text, before tokenisation.
    """
    count = Counter(matched)
    parts = [(EOC_TOKEN + MEDIA_TOKEN) * count[i] + s for i, s in enumerate(sentences)]
    text = clean_special_spacing(" ".join(parts).replace(EOC_TOKEN, "", 1))
    return f"{text}{EOC_TOKEN}{eos_token or ''}"


def has_special_text(texts: list[str]) -> bool:
    """True if any string contains a literal `<image>` or `<|endofchunk|>`."""
    return any(MEDIA_TOKEN in t or EOC_TOKEN in t for t in texts)


# ----------------------------------------------------------------------------- images


def candidate_images(infos: list, min_bytes: int, notes: Counter) -> dict[int, Image.Image]:
    """Decode the images that pass the base64 and size rules.

    Args:
        infos: the document's image_info list.
        min_bytes: minimum encoded size.
        notes: image-level drops are counted here (image_missing, image_bad_base64,
            image_too_small, image_undecodable).
    Returns:
        image index -> decoded RGB image.
    """
    images = {}
    for i, info in enumerate(infos):
        encoded = info.get("image_base64") if isinstance(info, dict) else None
        if not encoded:
            notes["image_missing"] += 1
            continue
        try:
            raw = base64.b64decode(encoded)
        except (binascii.Error, ValueError, TypeError):
            notes["image_bad_base64"] += 1
            continue
        if len(raw) < min_bytes:
            notes["image_too_small"] += 1
            continue
        try:
            images[i] = decode_image(raw)
        except SkipSample:
            notes["image_undecodable"] += 1
    return images


def match_images(sim: np.ndarray, rows: list[int], matching: str,
                 threshold: float) -> list[tuple[int, int]]:
    """Assign images to sentences.

    Args:
        sim: (num_images, num_sentences) similarities.
        rows: the candidate image indices (ascending).
        matching: "one_to_one" (Hungarian on -sim) or "argmax" (per image).
        threshold: pairs with similarity below it are dropped.
    Returns:
        (image index, sentence index) pairs in image order.
    """
    if not rows or sim.shape[1] == 0:
        return []
    sub = sim[rows]
    if matching == "one_to_one":
        from scipy.optimize import linear_sum_assignment

        image_ix, sentence_ix = linear_sum_assignment(-sub)
    else:
        image_ix, sentence_ix = np.arange(len(rows)), sub.argmax(axis=1)
    return [(rows[i], int(j)) for i, j in zip(image_ix, sentence_ix) if sub[i, j] >= threshold]


# ----------------------------------------------------------------------------- documents


def parse_document(fields: dict) -> dict:
    """The JSON document of a raw sample. Raises SkipSample("missing_key" / "bad_json")."""
    if "json" not in fields:
        raise SkipSample("missing_key")
    try:
        doc = json.loads(fields["json"])
    except (ValueError, UnicodeDecodeError):
        raise SkipSample("bad_json") from None
    if not isinstance(doc, dict):
        raise SkipSample("bad_json")
    return doc


def read_mmc4_fields(doc: dict) -> tuple[list[str], np.ndarray, list]:
    """(sentences, similarity (I, S), image_info) of an MMC4 document.

    Raises:
        SkipSample: "missing_key", "bad_json" (wrong types), "bad_similarity" (wrong shape),
            "special_token_in_text".
    """
    try:
        sentences, sims, infos = doc["text_list"], doc["similarity_matrix"], doc["image_info"]
    except KeyError:
        raise SkipSample("missing_key") from None
    if not (isinstance(sentences, list) and isinstance(infos, list)
            and all(isinstance(s, str) for s in sentences)):
        raise SkipSample("bad_json")
    try:
        sim = np.asarray(sims, dtype=np.float64).reshape(len(infos), len(sentences))
    except (ValueError, TypeError):
        raise SkipSample("bad_similarity") from None
    if has_special_text(sentences):
        raise SkipSample("special_token_in_text")
    return sentences, sim, infos


def finish_sample(text: str, images: list[Image.Image], encoder: TextEncoder,
                  tokens: FlamingoTokens, min_num_images: int, keep_prob: Optional[float],
                  flip: bool, keep_u: float) -> Sample:
    """Tokenise, apply the image-count rules, drop images whose token was truncated, label.

    Args:
        text: the training string.
        images: images in `<image>`-token order.
        encoder: fixed-length tokeniser.
        tokens: the Flamingo token ids.
        min_num_images: reject below this many `<image>` tokens.
        keep_prob: keep probability of single-image documents (None: always kept).
        flip: the document's flip coin.
        keep_u: the document's uniform draw for the keep coin.
    Returns:
        The sample.
    Raises:
        SkipSample: "too_few_images", "single_image_dropped", "image_at_end".
    """
    input_ids, attention_mask = encoder(text)
    num_tokens = int((input_ids == tokens.media_token_id).sum())
    if num_tokens < min_num_images:
        raise SkipSample("too_few_images")
    if num_tokens == 1 and keep_prob is not None and keep_prob < 1 and keep_u <= 1 - keep_prob:
        raise SkipSample("single_image_dropped")
    if num_tokens == 1 and int(input_ids[-1]) == tokens.media_token_id:
        raise SkipSample("image_at_end")
    return Sample(images=images[:num_tokens], flip=flip, input_ids=input_ids,
                  attention_mask=attention_mask, labels=mmc4_labels(input_ids, tokens))


def preprocess_mmc4(fields: dict, encoder: TextEncoder, tokens: FlamingoTokens,
                    eos_token: Optional[str], options: MMC4Options, max_num_media: int,
                    rng: random.Random, notes: Optional[Counter] = None) -> Sample:
    """One MMC4 (or is_gpt) document -> `Sample`.

    Args:
        fields: raw webdataset sample, extension -> bytes (uses "json").
        encoder: fixed-length tokeniser (seq_len of the stream).
        tokens: the Flamingo token ids.
        eos_token: the tokenizer's EOS string.
        options: matching, threshold, size and count rules.
        max_num_media: M, the most images kept.
        rng: the document's own RNG; draws: flip, then the single-image keep coin.
        notes: images dropped inside the document are counted here, by reason, whether or not
            the document is kept.
    Returns:
        The sample.
    Raises:
        SkipSample: the document is unusable or rejected by a rule (the reason names which).
    """
    flip, keep_u = rng.random() < 0.5, rng.random()
    doc = parse_document(fields)
    if "is_gpt" in doc:
        return preprocess_gpt(doc, encoder, tokens, eos_token, options, max_num_media, flip)
    sentences, sim, infos = read_mmc4_fields(doc)
    notes = Counter() if notes is None else notes
    images = candidate_images(infos, options.min_image_bytes, notes)
    pairs = match_images(sim, sorted(images), options.matching, options.sim_threshold)
    if not pairs:
        raise SkipSample("no_images")
    kept = sorted(pairs[:max_num_media], key=lambda pair: pair[1])  # stable: sentence order
    text = interleaved_text(sentences, [j for _, j in kept], eos_token)
    return finish_sample(text, [images[i] for i, _ in kept], encoder, tokens,
                         options.min_num_images, options.single_image_keep_prob, flip, keep_u)


def gpt_text_and_images(doc: dict, max_num_media: int) -> tuple[str, list[Image.Image]]:
    """Text (markers replaced, cut after max_num_media images) and images of an is_gpt document.

    Raises:
        SkipSample: "missing_key", "bad_json", "bad_image", "special_token_in_text".
    """
    example, image_map = doc.get("example"), doc.get("image_map")
    if not isinstance(example, str) or not isinstance(image_map, dict):
        raise SkipSample("missing_key" if example is None or image_map is None else "bad_json")
    names = GPT_MARKER.findall(example)
    try:
        encoded = [image_map[name]["base64_image"] for name in names]
    except (KeyError, TypeError):
        raise SkipSample("missing_key") from None
    if has_special_text([example]):
        raise SkipSample("special_token_in_text")
    text = GPT_MARKER.sub(EOC_TOKEN + MEDIA_TOKEN, example)
    text = clean_special_spacing(text.replace(EOC_TOKEN, "", 1))
    starts = [m.start() for m in re.finditer(re.escape(MEDIA_TOKEN), text)]
    if len(starts) > max_num_media:
        text = text[: starts[max_num_media]]
        text = text[: -len(EOC_TOKEN)] if text.endswith(EOC_TOKEN) else text
    images = []
    for value in encoded[:max_num_media]:
        try:
            images.append(decode_image(base64.b64decode(value)))
        except (binascii.Error, ValueError, TypeError):
            raise SkipSample("bad_image") from None
    return text, images


def preprocess_gpt(doc: dict, encoder: TextEncoder, tokens: FlamingoTokens,
                   eos_token: Optional[str], options: MMC4Options, max_num_media: int,
                   flip: bool) -> Sample:
    """An is_gpt document -> `Sample` (no size filter and no single-image coin, as the reference)."""
    text, images = gpt_text_and_images(doc, max_num_media)
    if not images:
        raise SkipSample("no_images")
    return finish_sample(f"{text}{EOC_TOKEN}{eos_token or ''}", images, encoder, tokens,
                         options.min_num_images, None, flip, 1.0)


# ----------------------------------------------------------------------------- conversion


def read_raw_documents(path: str) -> Iterator[dict]:
    """MMC4 documents from a `.jsonl` file or a `.zip` holding one (the released `*.jsonl.zip`)."""
    if path.endswith(".zip"):
        import zipfile

        with zipfile.ZipFile(path) as archive, archive.open(archive.namelist()[0]) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
        return
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def attach_images(doc: dict, image_dirs: list[Path], notes: Counter) -> dict:
    """Add image_info[i].image_base64 (a JPEG re-encode) for every image found on disk."""
    for info in doc.get("image_info", []):
        found = next((d / info["image_name"] for d in image_dirs
                      if (d / info.get("image_name", "")).is_file()), None)
        if found is None:
            notes["image_not_found"] += 1
            continue
        try:
            out = io.BytesIO()
            Image.open(found).convert("RGB").save(out, format="JPEG")
        except OSError:
            notes["image_unreadable"] += 1
            continue
        info["image_base64"] = base64.b64encode(out.getvalue()).decode()
        notes["images"] += 1
    return doc


def convert_mmc4(doc_files: list[str], image_dir: str | Path, out_dir: str | Path,
                 shard_size: int = 1000, limit: Optional[int] = None) -> dict:
    """Write OpenFlamingo's MMC4 shard format from raw MMC4 documents and downloaded images.

    Images are looked up as `image_dir/<image_name>`, then `image_dir/<file number>/<image_name>`
    (the layout OpenFlamingo's converter expects). Keys are the running document number, so the
    output is reproducible (the reference uses random uuids).

    Args:
        doc_files: raw `.jsonl` / `.jsonl.zip` files.
        image_dir: folder of downloaded images.
        out_dir: where `%09d.tar` shards go (created).
        shard_size: documents per shard.
        limit: stop after this many documents.
    Returns:
        Counts: documents, shards, images attached, images not found / unreadable.
    """
    out, root, notes = Path(out_dir), Path(image_dir), Counter()
    out.mkdir(parents=True, exist_ok=True)

    def samples() -> Iterator[dict]:
        docs = (attach_images(doc, [root, root / str(n)], notes)
                for n, path in enumerate(doc_files) for doc in read_raw_documents(path))
        for count, doc in enumerate(itertools.islice(docs, limit)):
            notes["documents"] += 1
            yield {"__key__": f"{count:09d}", "json": doc}

    shards = write_shards(samples(), str(out / "%09d.tar"), shard_size)
    return {**notes, "shards": len(shards)}
