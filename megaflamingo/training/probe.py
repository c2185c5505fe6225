"""Training diagnostics: is the model using the image? (`train.probe_*`, logged by the loop)

    gate_metrics(model)            -> {"gates/attn_<i>": tanh, "gates/ff_<i>": tanh}   every step
    AnswerLossProbe(path, limit, tokenizer, transform)(model)   (build_probe(cfg, tokenizer))
                                   -> {"probe/answer_loss_real", "probe/answer_loss_blank",
                                       "probe/answer_loss_gap"}                          every K steps

The probe scores held-out VQA questions in OpenFlamingo's training format
`<image>Question:{q} Short answer:{a}<|endofchunk|>`: the mean loss over the answer tokens and
`<|endofchunk|>`, once with the real images and once with every image blanked (zeros, as the
eval's blank-image baseline). gap = blank - real: > 0 means the image helps predict the answer.

Shapes: B questions, T tokens, C channels, S image side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from megaflamingo.config import ConfigError
from megaflamingo.data.easyvqa import ANSWER_MARK


def gate_metrics(model: nn.Module) -> dict[str, float]:
    """tanh of every cross-attention block's attn and ff gate, keyed by the block's decoder layer.

    Args:
        model: a Flamingo, or any module whose blocks live under an `xattn` ModuleDict.
    """
    out: dict[str, float] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if parts[-1] in ("attn_gate", "ff_gate") and "xattn" in parts and param.numel():  # ZeRO-3: empty
            layer = parts[parts.index("xattn") + 1]
            out[f"gates/{parts[-1].removesuffix('_gate')}_{layer}"] = math.tanh(float(param.detach().float().sum()))
    return out


class AnswerLossProbe:
    """The held-out answer loss with real vs blank images.

    Args:
        path: a VQA-format jsonl ({image (relative to the file), question, answers}).
        limit: questions used (the first `limit`).
        tokenizer: the run's tokenizer (with the Flamingo tokens).
        transform: the training image transform (an `ImageTransform`: PIL -> (C, S, S)).
    Raises:
        ValueError: the file has no questions.
    """

    def __init__(self, path: str | Path, limit: int, tokenizer, transform) -> None:
        path = Path(path)
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
        if not rows:
            raise ValueError(f"train.probe_data: no questions in {path}")
        texts = [f"<image>Question:{r['question']} {ANSWER_MARK}{r['answers'][0]}<|endofchunk|>" for r in rows]
        prefixes = [f"<image>Question:{r['question']} {ANSWER_MARK}" for r in rows]
        tokenizer.padding_side = "right"
        enc = tokenizer(texts, return_tensors="pt", padding="longest")
        labels = enc.input_ids.clone()
        labels[enc.attention_mask == 0] = -100
        for b, prefix in enumerate(prefixes):
            labels[b, :len(tokenizer(prefix).input_ids)] = -100
        self.input_ids, self.attention_mask, self.labels = enc.input_ids, enc.attention_mask, labels  # (B, T)
        images = [transform(Image.open(path.parent / r["image"]).convert("RGB")) for r in rows]
        self.images = torch.stack(images)[:, None, None]  # (B, 1, 1, C, S, S)

    @torch.no_grad()
    def answer_loss(self, model: nn.Module, blank: bool, batch_size: int = 16) -> float:
        """Mean over questions of the mean answer-token loss (each question weighs the same)."""
        device, dtype = next(p for p in model.parameters()).device, next(p for p in model.parameters()).dtype
        losses = []
        for s in range(0, self.input_ids.shape[0], batch_size):
            images = self.images[s:s + batch_size]
            images = torch.zeros_like(images) if blank else images
            ids, labels = self.input_ids[s:s + batch_size].to(device), self.labels[s:s + batch_size].to(device)
            logits = model(images.to(device, dtype), ids, self.attention_mask[s:s + batch_size].to(device))
            nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                  reduction="none").view(ids.shape[0], -1)  # (B, T-1)
            mask = (labels[:, 1:] != -100).float()
            losses.append((nll * mask).sum(1) / mask.sum(1).clamp(min=1))
        return float(torch.cat(losses).mean())

    def __call__(self, model: nn.Module) -> dict[str, float]:
        """Both losses and their gap; `model` is put back in the mode it was in."""
        was_training = model.training
        model.eval()
        try:
            real, blank = self.answer_loss(model, False), self.answer_loss(model, True)
        finally:
            model.train(was_training)
        return {"probe/answer_loss_real": real, "probe/answer_loss_blank": blank, "probe/answer_loss_gap": blank - real}


def build_probe(cfg, tokenizer) -> Optional[AnswerLossProbe]:
    """The run's answer-loss probe, or None when `train.probe_every`/`probe_data` leave it off.

    Args:
        cfg: the run config (`train.probe_*`, and the image transform's settings).
        tokenizer: the run's tokenizer.
    Raises:
        ConfigError: the probe is asked for on a pipeline layout (no single module runs the model).
    """
    if not (cfg.train.probe_every and cfg.train.probe_data):
        return None
    if cfg.parallel.pp > 1:
        raise ConfigError("train.probe_every: the answer-loss probe needs parallel.pp=1")
    from megaflamingo.data.images import build_image_transform

    return AnswerLossProbe(cfg.train.probe_data, cfg.train.probe_limit, tokenizer, build_image_transform(cfg))

