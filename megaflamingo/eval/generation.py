"""Text generation (greedy, beam search) and class ranking by log-likelihood, over a small decoder
interface so that the same loops run with or without a KV cache.

Shapes: B batch (rows: prompts x beams), M media, T prompt tokens, K new tokens, V vocabulary, C classes.

A `Decoder` turns a prompt into a `DecodingState` and extends states with tokens; states are values
(extending one never changes it), so one prompt's state can be extended by several continuations
(class ranking) and rows can be re-selected (beam search):

    logits_BV, state = decoder.start(vision_x, input_ids, attention_mask)
    logits_BKV, state2 = decoder.extend(state, tokens_BK)
    state3 = decoder.select(state2, rows)   # rows: (B',) indices into the state's rows

`UncachedDecoder` re-runs the whole sequence (media included) for every call: the reference.
Beam search follows transformers' `generate(num_beams=n, length_penalty=p, early_stopping=False)`
(what OpenFlamingo's `Flamingo.generate` calls), checked against transformers 5.24 in tests/eval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

DecodingState = Any
"""Whatever a Decoder keeps between calls (token ids, KV caches, encoded media)."""


class Decoder(Protocol):
    """What the generation loops need from a model."""

    def start(self, vision_x: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> tuple[torch.Tensor, DecodingState]:
        """Run a left-padded prompt (B, T); return the last position's logits (B, V) and a state."""

    def extend(self, state: DecodingState, tokens: torch.Tensor) -> tuple[torch.Tensor, DecodingState]:
        """Append tokens (B, K) to every row; return their logits (B, K, V) and the new state."""

    def select(self, state: DecodingState, rows: torch.Tensor) -> DecodingState:
        """The state of rows `rows` (B',) of `state` (repeats allowed)."""


@dataclass(frozen=True)
class _Sequence:
    vision_x: torch.Tensor  # (B, M, 1, C, S, S)
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)


class UncachedDecoder:
    """A Decoder that runs `model.hidden_states` on the whole sequence every call (no cache).

    Args:
        model: a Flamingo (`hidden_states(vision_x, input_ids, attention_mask)`, `lm.logits(h)`).
    """

    def __init__(self, model) -> None:
        self.model = model

    def _logits(self, seq: _Sequence, last: int) -> torch.Tensor:
        h = self.model.hidden_states(seq.vision_x, seq.input_ids, seq.attention_mask)[:, -last:]
        return self.model.lm.logits(h).float()  # (B, last, V)

    def start(self, vision_x: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> tuple[torch.Tensor, _Sequence]:
        seq = _Sequence(vision_x, input_ids, attention_mask)
        return self._logits(seq, 1)[:, 0], seq

    def extend(self, state: _Sequence, tokens: torch.Tensor) -> tuple[torch.Tensor, _Sequence]:
        seq = _Sequence(state.vision_x, torch.cat([state.input_ids, tokens], dim=1),
                        torch.cat([state.attention_mask, torch.ones_like(tokens)], dim=1))
        return self._logits(seq, tokens.shape[1]), seq

    def select(self, state: _Sequence, rows: torch.Tensor) -> _Sequence:
        return _Sequence(state.vision_x[rows], state.input_ids[rows], state.attention_mask[rows])


@torch.no_grad()
def greedy_search(decoder: Decoder, vision_x: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int) -> list[list[int]]:
    """Greedy decoding; a row stops at its first `eos_token_id` (kept in its output).

    Args:
        decoder: the model behind the Decoder interface.
        vision_x: (B, M, 1, C, S, S); input_ids, attention_mask: (B, T) left-padded prompts.
        max_new_tokens: tokens to generate at most per row.
        eos_token_id: `<|endofchunk|>` in OpenFlamingo's evaluation.
    Returns:
        B lists of generated token ids.
    """
    logits, state = decoder.start(vision_x, input_ids, attention_mask)
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    done = [False] * len(out)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # (B,)
        for row, token in enumerate(nxt.tolist()):
            if not done[row]:
                out[row].append(token)
                done[row] = token == eos_token_id
        if all(done) or step == max_new_tokens - 1:
            break
        logits, state = decoder.extend(state, nxt[:, None])
        logits = logits[:, -1]
    return out


@dataclass
class _Finished:
    """The finished hypotheses of one prompt: the best num_beams (score, tokens)."""

    num_beams: int
    items: list[tuple[float, list[int]]]

    def add(self, score: float, tokens: list[int]) -> None:
        self.items.append((score, tokens))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.num_beams:]

    def can_improve(self, best_running: float) -> bool:
        return len(self.items) < self.num_beams or best_running > self.items[-1][0]


@torch.no_grad()
def beam_search(decoder: Decoder, vision_x: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
                num_beams: int = 3, length_penalty: float = 0.0) -> list[list[int]]:
    """Beam search as transformers (5.x) `generate(num_beams, length_penalty, early_stopping=False)`.

    Each step takes the 2 x num_beams best (beam, token) continuations of a prompt by summed
    log-probability. Those among the first num_beams that end in `eos_token_id` (at the last step:
    all of them) become hypotheses scored sum / generated_len ** length_penalty (generated_len
    counts the new token); the best num_beams hypotheses are kept. The best num_beams others are
    the next running beams. A prompt stops taking hypotheses once it has num_beams of them and its
    best running beam's sum / generated_len ** length_penalty no longer beats the worst.

    Args:
        decoder, vision_x, input_ids, attention_mask, max_new_tokens, eos_token_id: as `greedy_search`.
        num_beams: beams per prompt (OpenFlamingo: 3).
        length_penalty: exponent of the length normalisation (OpenFlamingo: 0.0, i.e. none).
    Returns:
        B lists of generated token ids: each prompt's best hypothesis (with its eos if it has one).
    """
    B = input_ids.shape[0]
    rows = torch.arange(B).repeat_interleave(num_beams)
    logits, state = decoder.start(vision_x[rows], input_ids[rows], attention_mask[rows])
    scores = torch.zeros(B, num_beams)
    scores[:, 1:] = -1e9  # the first step expands beam 0 only
    beams: list[list[int]] = [[] for _ in range(B * num_beams)]
    finished = [_Finished(num_beams, []) for _ in range(B)]
    active = [True] * B
    for step in range(max_new_tokens):
        last = step == max_new_tokens - 1
        total = torch.log_softmax(logits, dim=-1) + scores.view(-1, 1)  # (B*nb, V)
        V = total.shape[-1]
        top_scores, top_ids = total.view(B, num_beams * V).topk(2 * num_beams, dim=1)  # best first
        next_rows, next_tokens, next_scores, next_beams = [], [], [], []
        for b in range(B):
            running = []
            for rank, (s, idx) in enumerate(zip(top_scores[b].tolist(), top_ids[b].tolist())):
                src, token = b * num_beams + idx // V, idx % V
                if token == eos_token_id or last:
                    if rank < num_beams and active[b]:
                        finished[b].add(s / (step + 1) ** length_penalty, beams[src] + [token])
                elif len(running) < num_beams:
                    running.append((src, token, s))
            for src, token, s in running or [(b * num_beams, eos_token_id, -1e9)] * num_beams:
                next_rows.append(src)
                next_tokens.append(token)
                next_scores.append(s)
                next_beams.append(beams[src] + [token])
            best_running = running[0][2] if running else -1e9
            active[b] = active[b] and finished[b].can_improve(best_running / (step + 1) ** length_penalty)
        if last or not any(active):
            break
        scores, beams = torch.tensor(next_scores).view(B, num_beams), next_beams
        state = decoder.select(state, torch.tensor(next_rows))
        logits, state = decoder.extend(state, torch.tensor(next_tokens)[:, None])
        logits = logits[:, -1]
    return [f.items[0][1] for f in finished]


@torch.no_grad()
def rank_classes(decoder: Decoder, vision_x: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, class_tokens: list[list[int]],
                 normalize_length: bool = True) -> torch.Tensor:
    """Log-likelihood of each class name after each prompt; the prompt is run once (its state is
    extended by every class), as OpenFlamingo's `get_rank_classifications(use_cache=True)` intends.

    Args:
        decoder, vision_x, input_ids, attention_mask: as `greedy_search`.
        class_tokens: C token-id lists (class names tokenised alone, no special tokens).
        normalize_length: mean log-prob over a class's tokens (OpenFlamingo: True), else the sum.
    Returns:
        (B, C) log-likelihoods.
    """
    last, state = decoder.start(vision_x, input_ids, attention_mask)  # (B, V)
    out = []
    for tokens in class_tokens:
        ids = torch.tensor(tokens).expand(input_ids.shape[0], -1)  # (B, K)
        logits = last[:, None]
        if len(tokens) > 1:
            more, _ = decoder.extend(state, ids[:, :-1])  # (B, K-1, V)
            logits = torch.cat([logits, more], dim=1)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None])[..., 0]  # (B, K)
        out.append(logp.mean(dim=1) if normalize_length else logp.sum(dim=1))
    return torch.stack(out, dim=1)
