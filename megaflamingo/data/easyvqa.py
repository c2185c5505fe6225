"""easy-vqa (PyPI, MIT: 64x64 shape drawings with questions) as offline training and eval data.

`write_easy_vqa(out_dir)` writes, from the installed package and nothing else:

- `laion/NNNNN.tar`: img2dataset-style pairs (`{key}.jpg`, `{key}.txt`, `{key}.json`), one per
  train image that has a caption. Captions are derived from the image's questions and answers
  ("what color is the circle?" -> "blue" gives "a blue circle"; negated yes/no questions count).
- `mmc4/NNNNN.tar`: OpenFlamingo-format interleaved documents (`{key}.json` with text_list,
  similarity_matrix, image_info[*].image_base64). A document takes 1-7 consecutive train images,
  one describing sentence per image (a few left out, so some images have no good match) plus
  question/answer sentences, shuffled. The similarity of image i and sentence j is a synthetic
  CLIP-like score: 0.16, +0.07 if the sentence names the image's colour, +0.07 for its shape,
  +0.08 if it is the image's own description, + uniform(0, 0.02) jitter. The 0.24 threshold sits
  inside the one-attribute band (0.23-0.25), so some of those matches pass and some do not;
  sentences naming both attributes always pass, and argmax can put two images on one sentence.
  Images are JPEG re-encodes (as OpenFlamingo's converter does) at the native 64x64, about 1 KB:
  OpenFlamingo's 11,000-byte floor would drop every one, so train on these shards with
  `data.mmc4_options.min_image_bytes=0` (dataset.json repeats this).
- `laion_vqa/NNNNN.tar`: the same pair format, one pair per train (image, question), captioned in
  OpenFlamingo's VQA prompt format "Question:{q} Short answer:{a}": what the demo trains on, so
  that training and the VQA evaluation prompt agree. Pairs are in a seeded random order; colour
  and shape questions can be repeated (`open_repeats`).
- `vqa/test.jsonl` + `vqa/images/`: the test split as a VQA eval set, one JSON line per question
  {question_id, image (relative to the jsonl), question, answers (the answer x10, VQA style),
  question_type (color, shape, yes/no)}, in a seeded random order; `vqa/probe.jsonl`: the
  questions of held-out test images (10%, not in test.jsonl) for the training probe.
- `dataset.json`: counts, shard patterns and the recommended overrides.
"""

from __future__ import annotations

import base64
import io
import json
import random
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

import torch
from PIL import Image

from megaflamingo.data.shards import write_shards

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
DESCRIBE = ("This picture shows {}.", "Here we see {}.", "The drawing is {}.", "Look at {}.")
ANSWER_MARK = "Short answer:"
"""Where the answer starts in OpenFlamingo's VQA format "Question:{q} Short answer:{a}"."""


def question_type(answer: str) -> str:
    """"color", "shape" or "yes/no": what kind of question an easy-vqa answer answers."""
    return "color" if answer in COLORS else "shape" if answer in SHAPES else "yes/no"


def answer_only_labels(labels: torch.Tensor, text: str, encode) -> torch.Tensor:
    """Labels of a VQA-format training text with every position up to the answer set to -100.

    The loss then covers the answer and what follows it (`<|endofchunk|>`, EOS). A text without
    ANSWER_MARK keeps its labels (it is not a VQA sample).

    Args:
        labels: (T,) the stream's labels for `text`.
        text: the full training string, e.g. "<image>Question:{q} Short answer:{a}<|endofchunk|>".
        encode: the stream's fixed-length encoder, text -> (input_ids (T,), attention_mask (T,)).
    Returns:
        (T,) new labels.
    """
    cut = text.find(ANSWER_MARK)
    if cut < 0:
        return labels
    _, prefix_mask = encode(text[:cut + len(ANSWER_MARK)])
    out = labels.clone()
    out[:int(prefix_mask.sum())] = -100
    return out


def _words(text: str) -> list[str]:
    return text.lower().replace("?", " ").replace(".", " ").split()


def attributes(qas: list[tuple[str, str]]) -> tuple[Optional[str], Optional[str]]:
    """(colour, shape) of an image, read off its (question, answer) pairs (None if unknown)."""
    color = shape = None
    for question, answer in qas:
        words = _words(question)
        named_color = next((w for w in words if w in COLORS), None)
        named_shape = next((w for w in words if w in SHAPES), None)
        if answer in SHAPES:
            shape, color = answer, color or named_color
        elif answer in COLORS:
            color, shape = answer, shape or named_shape
        elif answer in ("yes", "no"):
            negated = "not" in words or "no" in words
            if (answer == "yes") != negated:
                color, shape = color or named_color, shape or named_shape
    return color, shape


def caption(color: Optional[str], shape: Optional[str]) -> Optional[str]:
    """"a blue circle" / "a blue shape" / "a circle"; None when nothing is known."""
    if color and shape:
        return f"a {color} {shape}"
    if color or shape:
        return f"a {color} shape" if color else f"a {shape}"
    return None


def load_split(split: str) -> tuple[dict[int, str], dict[int, list[tuple[str, str]]]]:
    """(image id -> png path, image id -> [(question, answer)]) of the installed easy-vqa split."""
    import easy_vqa

    if split == "train":
        paths, (questions, answers, ids) = easy_vqa.get_train_image_paths(), easy_vqa.get_train_questions()
    else:
        paths, (questions, answers, ids) = easy_vqa.get_test_image_paths(), easy_vqa.get_test_questions()
    qas: dict[int, list] = defaultdict(list)
    for question, answer, image_id in zip(questions, answers, ids):
        qas[image_id].append((question, answer))
    return paths, qas


def jpeg_bytes(path: str, quality: int = 95) -> bytes:
    """The image at `path` re-encoded as RGB JPEG."""
    out = io.BytesIO()
    Image.open(path).convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def laion_samples(images: list[tuple[int, str, str]]) -> Iterator[dict]:
    """img2dataset-style samples from (image id, png path, caption)."""
    for n, (image_id, path, text) in enumerate(images):
        key = f"{n:09d}"
        meta = {"key": key, "caption": text, "status": "success", "easy_vqa_id": image_id,
                "width": 64, "height": 64}
        yield {"__key__": key, "jpg": jpeg_bytes(path), "txt": text, "json": meta}


def vqa_pair_samples(paths: dict[int, str], qas: dict, image_ids: list[int], seed: int = 0,
                     open_repeats: int = 1) -> Iterator[dict]:
    """One img2dataset-style pair per (image, question), captioned as an OpenFlamingo VQA prompt,
    in a seeded random order (any stretch of the shards spans many images).

    Args:
        open_repeats: colour and shape questions are written this many times (yes/no once): the
            answers that need the image most get a larger share of a short training run.
    """
    rows = [(i, paths[i], f"Question:{q} Short answer:{a}") for i in image_ids for q, a in qas[i]
            for _ in range(1 if question_type(a) == "yes/no" else open_repeats)]
    random.Random(seed).shuffle(rows)
    yield from laion_samples(rows)


def document(images: list[tuple[int, str, tuple]], qas: dict, rng: random.Random) -> dict:
    """One MMC4-format document from (image id, path, (colour, shape)) triples."""
    sentences, owners = [], []
    for k, (image_id, _, attrs) in enumerate(images):
        if rng.random() < 0.8:
            sentences.append(rng.choice(DESCRIBE).format(caption(*attrs)))
            owners.append(k)
        for question, answer in rng.sample(qas[image_id], min(1, len(qas[image_id]))):
            sentences.append(f"{question[0].upper()}{question[1:]} {answer.capitalize()}.")
            owners.append(-1)
    order = list(range(len(sentences)))
    rng.shuffle(order)
    sentences, owners = [sentences[i] for i in order], [owners[i] for i in order]
    sim = [[_similarity(attrs, s, owner == k, rng) for s, owner in zip(sentences, owners)]
           for k, (_, _, attrs) in enumerate(images)]
    infos = [{"image_name": f"{image_id}.jpg", "matched_text_index": max(range(len(row)), key=row.__getitem__),
              "image_base64": base64.b64encode(jpeg_bytes(path)).decode()}
             for (image_id, path, _), row in zip(images, sim)]
    return {"text_list": sentences, "similarity_matrix": sim, "image_info": infos}


def _similarity(attrs: tuple, sentence: str, own: bool, rng: random.Random) -> float:
    words = _words(sentence)
    color, shape = attrs
    score = 0.16 + 0.07 * (color in words) + 0.07 * (shape in words) + 0.08 * own
    return round(score + rng.uniform(0, 0.02), 4)


def mmc4_samples(images: list[tuple[int, str, tuple]], qas: dict, seed: int) -> Iterator[dict]:
    """Documents of 1-7 consecutive images each."""
    rng = random.Random(seed)
    start, n = 0, 0
    while start < len(images):
        size = rng.randint(1, 7)
        doc = document(images[start : start + size], qas, rng)
        yield {"__key__": f"{n:09d}", "json": doc}
        start, n = start + size, n + 1


def write_vqa(out_dir: Path, limit: Optional[int], seed: int = 0, probe_images: float = 0.1) -> tuple[int, int]:
    """The test split as a VQA eval set under out_dir: images/, test.jsonl and probe.jsonl.

    test.jsonl holds the questions in a seeded random order, so that its first n lines (what an
    eval with a limit reads) span many images, not the first few. probe.jsonl holds the questions
    of the last `probe_images` fraction of the images, none of which test.jsonl uses: a held-out
    set for the training probe (`train.probe_data`). Each line: {question_id, image (relative to
    the jsonl), question, answers (the answer x10, VQA style), question_type}.

    Returns:
        (questions in test.jsonl, questions in probe.jsonl).
    """
    paths, qas = load_split("test")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    image_ids = sorted(paths)[:limit]
    held = max(1, int(len(image_ids) * probe_images)) if len(image_ids) > 1 else 0
    rows = []
    for image_id in image_ids:
        shutil.copyfile(paths[image_id], out_dir / "images" / f"{image_id}.png")
        rows.extend({"image": f"images/{image_id}.png", "question": q, "answers": [a] * 10,
                     "question_type": question_type(a)} for q, a in qas[image_id])
    split = sum(len(qas[i]) for i in image_ids[:len(image_ids) - held])
    test, probe = rows[:split], rows[split:]
    random.Random(seed).shuffle(test)
    for name, part in (("test.jsonl", test), ("probe.jsonl", probe)):
        with open(out_dir / name, "w") as f:
            f.writelines(json.dumps({"question_id": n, **row}) + "\n" for n, row in enumerate(part))
    return len(test), len(probe)


def write_easy_vqa(out_dir: str | Path, limit: Optional[int] = None, shard_size: int = 100,
                   seed: int = 0, open_repeats: int = 1) -> dict:
    """Write LAION-style, MMC4-style and VQA-eval data from the installed easy-vqa package.

    Args:
        out_dir: output directory (created).
        limit: use at most this many train images and test images (None: all).
        shard_size: samples (pairs or documents) per tar shard.
        seed: document composition, similarity jitter, the order of pairs and test questions.
        open_repeats: times each colour/shape question is written to laion_vqa (yes/no: once).
    Returns:
        The summary also written to out_dir/dataset.json.
    """
    out = Path(out_dir)
    for sub in ("laion", "mmc4", "laion_vqa"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    paths, qas = load_split("train")
    described = [(i, paths[i], attributes(qas[i])) for i in sorted(paths)[:limit]]
    captioned = [(i, p, caption(*a)) for i, p, a in described if caption(*a)]
    laion = write_shards(laion_samples(captioned), str(out / "laion" / "%05d.tar"), shard_size)
    known = [(i, p, a) for i, p, a in described if caption(*a)]
    mmc4 = write_shards(mmc4_samples(known, qas, seed), str(out / "mmc4" / "%05d.tar"), shard_size)
    image_ids = sorted(paths)[:limit]
    vqa_pairs = write_shards(vqa_pair_samples(paths, qas, image_ids, seed, open_repeats),
                             str(out / "laion_vqa" / "%05d.tar"), shard_size)
    questions, probe_questions = write_vqa(out / "vqa", limit, seed)
    summary = {
        "source": "easy-vqa (PyPI)", "laion_pairs": len(captioned),
        "laion_shards": f"laion/{{00000..{len(laion) - 1:05d}}}.tar",
        "mmc4_shards": f"mmc4/{{00000..{len(mmc4) - 1:05d}}}.tar",
        "uncaptioned_images": len(described) - len(captioned),
        "laion_vqa_shards": f"laion_vqa/{{00000..{len(vqa_pairs) - 1:05d}}}.tar",
        "vqa_questions": questions, "vqa": "vqa/test.jsonl",
        "vqa_probe_questions": probe_questions, "vqa_probe": "vqa/probe.jsonl", "open_repeats": open_repeats,
        "recommended_overrides": ["data.mmc4_options.min_image_bytes=0"],
    }
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
