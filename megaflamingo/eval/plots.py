"""A loss-curve PNG from a run's metrics.jsonl, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from megaflamingo.training.metrics import read_metrics


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, key: str = "loss",
                    size: tuple[int, int] = (640, 360)) -> Path:
    """Draw `key` against `step` (axes labelled with their ranges) and save it as a PNG.

    Raises:
        ValueError: the metrics file has no finite `key` values.
    """
    points = [(r["step"], r[key]) for r in read_metrics(metrics_path)
              if isinstance(r.get(key), (int, float))]
    if not points:
        raise ValueError(f"{metrics_path}: no '{key}' values to plot")
    w, h, pad = size[0], size[1], 48
    steps, values = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(values), max(max(values), min(values) + 1e-6)
    to_xy = lambda s, v: (pad + (s - x0) / (x1 - x0) * (w - 2 * pad),  # noqa: E731
                          h - pad - (v - y0) / (y1 - y0) * (h - 2 * pad))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([pad, pad, w - pad, h - pad], outline="black")
    draw.line([to_xy(s, v) for s, v in points] if len(points) > 1 else [to_xy(*points[0])] * 2,
              fill=(31, 119, 180), width=2)
    draw.text((pad, 12), f"{key} vs step ({Path(metrics_path).parent.name})", fill="black")
    draw.text((pad, h - pad + 8), f"step {x0}", fill="black")
    draw.text((w - pad - 60, h - pad + 8), f"step {x1}", fill="black")
    draw.text((4, pad - 14), f"{y1:.3f}", fill="black")
    draw.text((4, h - pad + 2), f"{y0:.3f}", fill="black")
    image.save(png_path)
    return Path(png_path)
