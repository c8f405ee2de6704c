"""Report figures (matplotlib, Agg backend, PNG): ROC, precision-recall, confusion matrix, calibration, and a
montage of heatmap overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out_dir: Path, name: str, files: dict[str, str]) -> None:
    """Write ``fig`` as ``<name>.png`` in ``out_dir``, close it and record it in ``files``."""
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=100)
    _pyplot().close(fig)
    files[name] = f"{name}.png"


def roc_pr_confusion_calibration(y: np.ndarray, p: np.ndarray, threshold: float, out_dir: Path,
                                 title: str = "") -> dict[str, str]:
    """Write roc.png, pr.png, confusion.png and calibration.png; returns name -> file name."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    y = np.asarray(y, dtype=int)
    p = np.asarray(p, dtype=float)
    both = len(np.unique(y)) == 2
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if both:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2)
        pred = p >= threshold
        fp_rate = ((y == 0) & pred).sum() / max((y == 0).sum(), 1)
        ax.plot([fp_rate], [((y == 1) & pred).sum() / max(y.sum(), 1)], "o", color="crimson",
                label=f"threshold {threshold:.3f}")
        ax.legend(loc="lower right")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC {title}".strip())
    _save(fig, out_dir, "roc", files)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if both:
        prec, rec, _ = precision_recall_curve(y, p)
        ax.plot(rec, prec, lw=2)
    ax.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02), title=f"Precision-recall {title}".strip())
    _save(fig, out_dir, "pr", files)
    cm = np.array([[((y == 0) & (p < threshold)).sum(), ((y == 0) & (p >= threshold)).sum()],
                   [((y == 1) & (p < threshold)).sum(), ((y == 1) & (p >= threshold)).sum()]])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black", fontsize=14)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["normal", "covid"], yticklabels=["normal", "covid"],
           xlabel="predicted", ylabel="true", title=f"Confusion at {threshold:.3f}")
    _save(fig, out_dir, "confusion", files)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if both:
        frac, mean = calibration_curve(y, p, n_bins=10, strategy="quantile")
        ax.plot(mean, frac, "o-", lw=2)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="mean predicted probability", ylabel="fraction covid", title=f"Calibration {title}".strip())
    _save(fig, out_dir, "calibration", files)
    return files


def montage(tiles: Sequence[np.ndarray], captions: Sequence[str], path: Path, *, tile: int = 256,
            columns: int = 4) -> Path:
    """RGB uint8 tiles (any size) resized to ``tile`` px squares in a grid, each with its caption."""
    if not tiles:
        raise ValueError('Argument "tiles" is empty.')
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, rows * (tile + 18)), "black")
    draw = ImageDraw.Draw(sheet)
    for i, (t, c) in enumerate(zip(tiles, captions, strict=True)):
        im = Image.fromarray(t).convert("RGB")
        im.thumbnail((tile, tile))
        x, y = (i % columns) * tile, (i // columns) * (tile + 18)
        sheet.paste(im, (x + (tile - im.width) // 2, y + (tile - im.height) // 2))
        draw.text((x + 4, y + tile + 3), c[:44], fill="white")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
