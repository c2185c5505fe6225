"""Few-shot evaluation: OpenFlamingo's benchmarks, prompts and metrics, offline.

Modules (each opens with its details):

- `metrics`: `vqa_accuracy` (modes `official`, `official_2017`, `openflamingo`; rules in
  `vqa_rules`), `cider` (pycocoevalcap PTB tokenizer + CIDEr-D, no SPICE; needs `java`),
  `roc_auc`, `postprocess_vqa` / `postprocess_caption` / `postprocess_ok_vqa`.
- `tasks`: the task table (prompts, generation settings) and the dataset readers.
- `demos`: scored items, random and RICES demonstrations.
- `generation`: greedy, beam search (== transformers' `generate`), class ranking, over a
  `Decoder` interface; `cache`: the KV-cached Decoder (media encoded once).
- `runner`: one (task, shots, seed) trial over data-parallel ranks; `suite`: the whole run behind
  `launcher/evaluate.py`; `report`: results JSON and the markdown table.
- `vqa`: the first demo loop, kept as an independent reference for tests; `plots`: the demo's plots.

Deliberate differences from open_flamingo 2.0.1's evaluation (each tested in tests/eval):

1. VQA questions and annotations are paired by `question_id`, not by list position (`tasks`).
2. Random demonstrations depend on the seed and the item only, not on the rank or batch
   (`demos`); N ranks give exactly the 1-rank result (`runner`).
3. 0-shot classification passes only the query image (open_flamingo also passes the two
   text-only demos' images, so the query's `<image>` attends to the first demo's image) (`runner`).
4. RICES uses the evaluated model's own frozen vision tower (mean-pooled patch tokens) instead
   of a separate CLIP, with features cached on disk (`demos`).
5. The query set is clamped to the training-set size instead of raising (`demos`).
6. CIDEr skips SPICE/METEOR/BLEU/ROUGE (COCOEvalCap runs them all; SPICE needs a download) and
   tokenises references and candidates in one Java run; the CIDEr value is the same (`metrics`).
7. VQA accuracy scores the predicted questions (the official scripts assert that every annotated
   question is predicted) (`metrics`).
8. Beam search follows transformers 5.x (`generation`); open_flamingo ran transformers 4.x, whose
   beam scorer stops a prompt by a slightly different test and finalises different beams at the
   length limit. At length_penalty 0 (OpenFlamingo's setting) sums only fall, so the best
   hypothesis is the same either way (ties aside).
9. Class ranking runs the prompt once and scores every class with the padding masked
   (open_flamingo's cached path feeds class tokens with no attention mask, so left padding is
   attended) (`generation.rank_classes`).
"""
