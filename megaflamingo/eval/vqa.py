"""The first demo evaluation loop (zero-shot greedy VQA, no KV cache, a light answer normalisation).

`launcher/evaluate.py` now runs the suite (`megaflamingo/eval/suite.py`) for the demo too; this
module stays as an independent reference that tests compare the suite's easy-vqa number with.

Shapes: B batch, M media, T text tokens.

Prompt (reference §5): `<image>Question:{q} Short answer:`; the generated text is cut at the first
"Question" / "Answer" / "Short" and at the first ", ", as OpenFlamingo's `postprocess_vqa_generation`
does. Accuracy is the VQA formula min(1, matches / 3) averaged over the ten leave-one-out subsets of
the ten human answers, on answers normalised by lower-casing and dropping punctuation and articles
(a light form of the official normalisation: enough for easy-vqa's one-word answers).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")


def vqa_prompt(question: str) -> str:
    return f"<image>Question:{question} Short answer:"


def postprocess_answer(text: str) -> str:
    """The answer part of a generation (OpenFlamingo's rule)."""
    return re.split("Question|Answer|Short", text, maxsplit=1)[0].split(", ")[0].strip()


def normalize_answer(text: str) -> str:
    words = _PUNCT.sub("", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """min(1, #humans who gave the prediction / 3), averaged over the leave-one-out subsets."""
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(g == pred for g in others) / 3))
    return sum(scores) / len(scores)


@torch.no_grad()
def greedy_generate(model, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int, eos_token_id: int) -> torch.Tensor:
    """Greedy decoding without a KV cache (answers are a few tokens: the prompt is re-run).

    Args:
        model: a Flamingo (single process).
        images: (B, M, 1, C, S, S).
        input_ids, attention_mask: (B, T) left-padded prompts.
        max_new_tokens: tokens to generate at most.
        eos_token_id: stops a row (`<|endofchunk|>`, as OpenFlamingo's eval).
    Returns:
        (B, <= max_new_tokens) generated ids; positions after a row's EOS hold EOS.
    """
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    out = []
    for _ in range(max_new_tokens):
        last = model.hidden_states(images, input_ids, attention_mask)[:, -1:]  # (B, 1, D)
        logits = model.lm.logits(last)[:, 0]  # (B, V): the head on the last position only
        nxt = torch.where(done, torch.full_like(done, eos_token_id, dtype=torch.long), logits.argmax(-1))
        out.append(nxt)
        done |= nxt == eos_token_id
        input_ids = torch.cat([input_ids, nxt[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(nxt[:, None])], dim=1)
        if bool(done.all()):
            break
    return torch.stack(out, dim=1)


@dataclass
class VQAItem:
    question: str
    answers: list[str]
    image: Path


def read_vqa_jsonl(path: str | Path, limit: int | None = None) -> list[VQAItem]:
    """Rows {image (relative to the file), question, answers} of a VQA-format jsonl."""
    path = Path(path)
    items = []
    for line in path.read_text().splitlines()[:limit]:
        row = json.loads(line)
        items.append(VQAItem(row["question"], row["answers"], path.parent / row["image"]))
    return items


def evaluate_vqa(model, tokenizer, transform, items: list[VQAItem], eos_token_id: int,
                 batch_size: int = 16, max_new_tokens: int = 5, blank_images: bool = False) -> dict:
    """Zero-shot VQA accuracy of `model` on `items`.

    Args:
        model: a Flamingo in eval mode.
        tokenizer: its tokenizer (left padding is set here).
        transform: image transform (PIL -> (C, S, S) tensor), the training one without flips.
        items: the questions.
        eos_token_id: `<|endofchunk|>`.
        blank_images: replace every image with zeros (a text-only baseline through the same model).
    Returns:
        {"accuracy": percent, "count": n, "examples": [(question, prediction, answer) x 5]}.
    """
    from PIL import Image

    tokenizer.padding_side = "left"
    scores, examples = [], []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        images = torch.stack([transform(Image.open(it.image).convert("RGB")) for it in batch])
        images = images[:, None, None]  # (B, 1, 1, C, S, S)
        if blank_images:
            images = torch.zeros_like(images)
        enc = tokenizer([vqa_prompt(it.question) for it in batch], return_tensors="pt", padding="longest")
        gen = greedy_generate(model, images, enc.input_ids, enc.attention_mask, max_new_tokens, eos_token_id)
        for it, ids in zip(batch, gen):
            answer = postprocess_answer(tokenizer.decode(ids, skip_special_tokens=True))
            scores.append(vqa_accuracy(answer, it.answers))
            if len(examples) < 5:
                examples.append((it.question, answer, it.answers[0]))
    return {"accuracy": 100.0 * sum(scores) / max(1, len(scores)), "count": len(scores), "examples": examples}
