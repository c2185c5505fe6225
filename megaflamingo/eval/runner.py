"""The evaluation loop: one (task, shots, seed) trial, batched, distributed over data-parallel ranks.

Per trial: draw the scored items and the query set (`demos.sample_order`), pick each item's
demonstrations (random or RICES), build OpenFlamingo's prompt and image list, generate (or rank
the classes), post-process, gather every rank's predictions in item order, and score on rank 0.
Items are cut into global batches of `batch_size` in scored order and batch i runs on rank
i % world, so every batch, its padding and its numbers are the same whatever the number of
ranks: N ranks give exactly the 1-rank result.

0-shot follows OpenFlamingo: `task.zero_shot_demos` demonstrations (2) with their text kept and
`<image>` removed, and only the query image. Deliberate difference: OpenFlamingo's
classification path also passes the demos' images at 0-shot, so the query's `<image>` attends to
the first demo's image; here only the query image is passed, as its caption and VQA paths do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from megaflamingo.eval.cache import CachedDecoder
from megaflamingo.eval.demos import Rices, random_demos, sample_order
from megaflamingo.eval.generation import Decoder, beam_search, greedy_search, rank_classes
from megaflamingo.eval.metrics import cider, roc_auc, score_vqa_answers
from megaflamingo.eval.tasks import Example, TaskData, TaskSpec


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel evaluation ranks."""

    rank: int = 0
    world: int = 1

    def gather(self, obj: object) -> list:
        """Every rank's `obj`, in rank order (all_gather_object; the identity on one rank)."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


@dataclass(frozen=True)
class TrialSettings:
    """What one trial runs; defaults are OpenFlamingo's."""

    shots: int
    seed: int = 42
    num_samples: int = -1
    query_set_size: int = 2048
    batch_size: int = 8
    rices: bool = False
    rices_cache: Path | None = None
    vqa_mode: str = "openflamingo"


def build_prompts(task: TaskSpec, items: list[Example], demos: list[list[Example]],
                  shots: int) -> tuple[list[str], list[list[Example]]]:
    """OpenFlamingo's prompt text and image list per item (0-shot: demo text without `<image>`,
    the query image only)."""
    texts, image_lists = [], []
    for item, its_demos in zip(items, demos):
        context = "".join(task.demo_prompt(d) for d in its_demos)
        if shots == 0:
            context = context.replace("<image>", "")
        texts.append(context + task.query_prompt(item))
        image_lists.append((list(its_demos) if shots > 0 else []) + [item])
    return texts, image_lists


@dataclass
class Evaluator:
    """A model with its tokenizer and image transform, ready to evaluate.

    Args:
        model: a Flamingo in eval mode.
        tokenizer: its Hugging Face tokenizer (with `<image>` / `<|endofchunk|>`).
        transform: PIL image -> (C, S, S) tensor.
        eoc_token_id: `<|endofchunk|>`, where generation stops.
        device: where the model lives.
        make_decoder: model -> Decoder (default: the KV-cached one; `UncachedDecoder` is the reference).
    """

    model: torch.nn.Module
    tokenizer: object
    transform: Callable
    eoc_token_id: int
    device: torch.device = torch.device("cpu")
    make_decoder: Callable[[torch.nn.Module], Decoder] = CachedDecoder
    blank_images: bool = False

    def load_images(self, examples: Sequence[Example]) -> torch.Tensor:
        """(B, C, S, S) transformed images on the model's device (zeros when blanking)."""
        from PIL import Image

        images = torch.stack([self.transform(Image.open(ex.image).convert("RGB")) for ex in examples])
        return (torch.zeros_like(images) if self.blank_images else images).to(self.device)

    def batch_inputs(self, image_lists: list[list[Example]], texts: list[str]):
        """Zero-padded (B, M, 1, C, S, S) images and left-padded (B, T) ids and mask."""
        M = max(len(x) for x in image_lists)
        flat = self.load_images([ex for x in image_lists for ex in x])
        vision_x = torch.zeros(len(image_lists), M, 1, *flat.shape[1:], device=self.device)
        at = 0
        for b, x in enumerate(image_lists):
            vision_x[b, :len(x), 0] = flat[at:at + len(x)]
            at += len(x)
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=2000, return_tensors="pt")
        return vision_x, enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    @torch.no_grad()
    def run_batch(self, task: TaskSpec, items: list[Example], demos: list[list[Example]], shots: int) -> list:
        """Predictions for one batch: answer/caption strings, or P(class 1) for classification."""
        texts, image_lists = build_prompts(task, items, demos, shots)
        vision_x, ids, mask = self.batch_inputs(image_lists, texts)
        decoder = self.make_decoder(self.model)
        if task.kind == "classification":
            tokens = [self.tokenizer(c, add_special_tokens=False).input_ids for c in task.class_names]
            logp = rank_classes(decoder, vision_x, ids, mask, tokens)  # (B, C)
            return torch.softmax(logp, dim=1)[:, 1].tolist()
        if task.num_beams > 1:
            out = beam_search(decoder, vision_x, ids, mask, task.max_new_tokens, self.eoc_token_id,
                              task.num_beams, task.length_penalty)
        else:
            out = greedy_search(decoder, vision_x, ids, mask, task.max_new_tokens, self.eoc_token_id)
        return [task.postprocess(self.tokenizer.decode(t, skip_special_tokens=True)) for t in out]


def _demos_for(task: TaskSpec, data: TaskData, settings: TrialSettings, query: list[int],
               rices: Rices | None, items: list[Example], positions: list[int]) -> list[list[Example]]:
    k = settings.shots if settings.shots > 0 else task.zero_shot_demos
    if k == 0:
        return [[] for _ in items]
    if rices is not None:
        return [[data.demos[i] for i in row] for row in rices.find(items, k)]
    return [[data.demos[i] for i in random_demos(query, k, settings.seed, p)] for p in positions]


def run_trial(ev: Evaluator, task: TaskSpec, data: TaskData, settings: TrialSettings,
              ranks: Ranks = Ranks(), progress: bool = False) -> dict | None:
    """Evaluate one (task, shots, seed) trial.

    Returns:
        On rank 0: {"score", "count", "predictions": [...]} (score: CIDEr x100, VQA accuracy %,
        ROC-AUC x100); None on the other ranks.
    Raises:
        ValueError: the task needs demonstrations and the data has none.
    """
    k = settings.shots if settings.shots > 0 else task.zero_shot_demos
    if k > 0 and not data.demos:
        raise ValueError(f"{task.name}: {settings.shots}-shot needs demonstrations; the data spec has no train split")
    order, query = sample_order(len(data.test), settings.num_samples, len(data.demos),
                                settings.query_set_size, settings.seed)
    rices = Rices(ev.model, data.demos, ev.load_images, settings.rices_cache, task.name) \
        if settings.rices and k > 0 else None
    starts = range(0, len(order), settings.batch_size)
    mine = [s for i, s in enumerate(starts) if i % ranks.world == ranks.rank]
    results = {}
    bar = _progress(mine, progress and ranks.rank == 0, f"{task.name} {settings.shots}-shot seed {settings.seed}")
    for start in bar:
        positions = list(range(start, min(start + settings.batch_size, len(order))))
        items = [data.test[order[p]] for p in positions]
        demos = _demos_for(task, data, settings, query, rices, items, positions)
        for p, pred in zip(positions, ev.run_batch(task, items, demos, settings.shots)):
            results[p] = pred
    merged = {p: v for part in ranks.gather(results) for p, v in part.items()}
    if ranks.rank != 0:
        return None
    items = [data.test[order[p]] for p in range(len(order))]
    return score(task, data, items, [merged[p] for p in range(len(order))], settings.vqa_mode)


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="batch")


def score(task: TaskSpec, data: TaskData, items: list[Example], preds: list, vqa_mode: str) -> dict:
    """Score predictions in item order with the task's metric (see `run_trial`)."""
    if task.kind == "caption":
        result = cider({ex.id: p for ex, p in zip(items, preds)}, {ex.id: list(ex.references) for ex in items})
        value, rows = 100 * result["score"], [{"image_id": ex.id, "caption": p} for ex, p in zip(items, preds)]
    elif task.kind == "vqa":
        rows = [{"question_id": ex.id, "answer": p} for ex, p in zip(items, preds)]
        value = score_vqa_answers(rows, {ex.id: list(ex.references) for ex in items}, vqa_mode)["overall"]
    else:
        value = 100 * roc_auc([ex.label for ex in items], preds)
        rows = [{"id": ex.id, "label": ex.label, "p_yes": p} for ex, p in zip(items, preds)]
    return {"score": value, "count": len(items), "predictions": rows}
