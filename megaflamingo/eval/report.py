"""Results of a suite run: the JSON summary and a markdown table beside OpenFlamingo's published numbers.

Published numbers: only those in this project's sources (the open_flamingo README's table, as
quoted in the reference notes): COCO 4-shot CIDEr and VQAv2 4-shot accuracy of the five released
models. The paper's full table (0/4/8/16/32 shots, seven datasets) is not among the sources, so
its other cells are left empty rather than quoted from memory.
"""

from __future__ import annotations

import statistics

PUBLISHED: dict[str, dict[tuple[str, int], float]] = {
    "OF-3B (mpt-1b)": {("coco", 4): 77.3, ("vqav2", 4): 45.8},
    "OF-3B-instruct": {("coco", 4): 82.7, ("vqav2", 4): 45.7},
    "OF-4B (redpajama-3b)": {("coco", 4): 81.8, ("vqav2", 4): 49.0},
    "OF-4B-instruct": {("coco", 4): 85.8, ("vqav2", 4): 49.0},
    "OF-9B (mpt-7b)": {("coco", 4): 89.0, ("vqav2", 4): 54.8},
}

METRIC = {"caption": "CIDEr x100", "vqa": "VQA acc. %", "classification": "ROC-AUC x100"}


def summarize(scores: list[float]) -> dict:
    """{"trials": scores, "mean", "std"} (std 0 for one trial)."""
    std = statistics.stdev(scores) if len(scores) > 1 else 0.0
    return {"trials": scores, "mean": statistics.fmean(scores), "std": std}


def markdown_table(results: dict[str, dict[int, dict]], kinds: dict[str, str]) -> str:
    """A markdown table: task, shots, metric, ours (mean +- std over trials), published columns.

    Args:
        results: {task: {shots: summarize(...)}}.
        kinds: {task: task kind} (names the metric).
    """
    models = list(PUBLISHED)
    lines = ["| task | shots | metric | megaflamingo | " + " | ".join(models) + " |",
             "|---|---|---|---|" + "---|" * len(models)]
    for task, by_shots in results.items():
        for shots, s in sorted(by_shots.items()):
            ours = f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if len(s["trials"]) > 1 else "")
            pub = [f"{PUBLISHED[m][(task, shots)]:.1f}" if (task, shots) in PUBLISHED[m] else ""
                   for m in models]
            lines.append(f"| {task} | {shots} | {METRIC[kinds[task]]} | {ours} | " + " | ".join(pub) + " |")
    return "\n".join(lines) + "\n"
