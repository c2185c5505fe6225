"""Training and evaluation plots (matplotlib, headless): what `make demo` shows.

    plot_run(metrics.jsonl, eval.json, out_dir) -> {name: png path}

- `loss.png`: the step loss and each stream's loss (`loss_<stream>`) against the step.
- `gates.png`: tanh of every cross-attention block's attn and ff gate (`gates/attn_<i>`,
  `gates/ff_<i>`) against the step, one line per block.
- `answer_loss.png`: the held-out answer loss with real and with blank images (`probe/...`).
- `accuracy.png`: held-out accuracy per question type, trained model vs the blank-image baseline
  (`eval.json`'s `trained.by_type` / `baseline.by_type`).

A plot whose metrics are absent from the run is left out (not drawn empty).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from megaflamingo.training.metrics import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records with a numeric `key`."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def _lines(records: list[dict], keys: list[str], png: Path, title: str, ylabel: str,
           labels: list[str] | None = None) -> Path | None:
    """One line per key against the step; None (no file) when no key has a value."""
    series = [(key, *_series(records, key)) for key in keys]
    series = [(k, s, v, lab) for (k, s, v), lab in zip(series, labels or keys) if s]
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for _, steps, values, label in series:
        ax.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None, markersize=3)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_loss(records: list[dict], png: Path) -> Path | None:
    """The step loss and every per-stream loss against the step."""
    keys = ["loss"] + sorted({k for r in records for k in r if k.startswith("loss_")})
    return _lines(records, keys, png, "training loss", "loss")


def _block_index(key: str) -> int:
    return int(re.sub(r"\D", "", key.rsplit("_", 1)[-1]) or 0)


def plot_gates(records: list[dict], png: Path) -> Path | None:
    """tanh(gate) of every block, attn (solid) and ff (dashed), against the step."""
    keys = {k for r in records for k in r if k.startswith("gates/")}
    attn = sorted((k for k in keys if k.startswith("gates/attn_")), key=_block_index)
    ff = sorted((k for k in keys if k.startswith("gates/ff_")), key=_block_index)
    if not attn and not ff:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, group, name in ((axes[0], attn, "attention"), (axes[1], ff, "feed-forward")):
        cmap = plt.get_cmap("viridis", max(2, len(group)))
        for n, key in enumerate(group):
            ax.plot(*_series(records, key), color=cmap(n), label=f"block {_block_index(key)}")
        ax.set(xlabel="step", title=f"tanh({name} gate) per block")
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("tanh(gate)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_answer_loss(records: list[dict], png: Path) -> Path | None:
    """Held-out answer loss with real vs blank images against the step."""
    return _lines(records, ["probe/answer_loss_real", "probe/answer_loss_blank"], png,
                  "held-out answer loss: real vs blank images", "answer loss (nats/token)",
                  labels=["real images", "blank images"])


def plot_accuracy(result: dict, png: Path) -> Path | None:
    """Bars per question type (and overall): trained model vs blank-image baseline."""
    trained, baseline = result.get("trained", {}), result.get("baseline", {})
    types = list(trained.get("by_type", {}))
    if not types:
        return None
    names = types + ["all"]
    values = {arm: [r["by_type"][t]["accuracy"] for t in types] + [r["accuracy"]]
              for arm, r in (("trained", trained), ("baseline", baseline)) if r.get("by_type")}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for n, (arm, label) in enumerate((("trained", "trained (real images)"), ("baseline", "blank images"))):
        if arm not in values:
            continue
        xs = [i + (n - 0.5) * width for i in range(len(names))]
        bars = ax.bar(xs, values[arm], width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    counts = [trained["by_type"][t]["count"] for t in types] + [trained["count"]]
    ax.set_xticks(range(len(names)), [f"{t}\n(n={c})" for t, c in zip(names, counts)])
    ax.set(ylabel="VQA accuracy (%)", ylim=(0, 105), title="held-out easy-vqa accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_run(metrics_path: str | Path, eval_path: str | Path | None, out_dir: str | Path) -> dict[str, Path]:
    """Every plot the run's files support, as PNGs in `out_dir`.

    Args:
        metrics_path: the run's metrics.jsonl.
        eval_path: an eval.json with trained/baseline accuracies (None or missing: no accuracy plot).
        out_dir: where the PNGs go (created).
    Returns:
        {plot name: PNG path} of the plots written.
    Raises:
        ValueError: the metrics file has no step loss.
    """
    records = read_metrics(metrics_path)
    if not _series(records, "loss")[0]:
        raise ValueError(f"{metrics_path}: no 'loss' values to plot")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = {"loss": plot_loss(records, out / "loss.png"), "gates": plot_gates(records, out / "gates.png"),
            "answer_loss": plot_answer_loss(records, out / "answer_loss.png")}
    if eval_path is not None and Path(eval_path).is_file():
        pngs["accuracy"] = plot_accuracy(json.loads(Path(eval_path).read_text()), out / "accuracy.png")
    return {name: png for name, png in pngs.items() if png is not None}
