"""Pictures people would rather see than read: learning curves, seeds, masks."""
from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless workers
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from ray_wsss.core.codec import VOC_PALETTE


def learning_curves_png(history: Sequence[dict], keys: Sequence[str] | None = None) -> bytes:
    """One panel per metric over epochs; losses and held-out metrics side by side."""
    keys = list(keys or sorted({k for row in history for k, v in row.items()
                                if k != "epoch" and isinstance(v, (int, float))}))
    cols = min(4, max(1, len(keys)))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    epochs = [row["epoch"] for row in history]
    for ax, key in zip(axes.flat, keys):
        ax.plot(epochs, [row.get(key, np.nan) for row in history], marker="o", ms=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def colorize(mask: np.ndarray) -> np.ndarray:
    """uint8 class ids -> RGB with the VOC palette (255 = ignore shows white)."""
    palette = np.array(VOC_PALETTE, np.uint8).reshape(256, 3).copy()
    palette[255] = 255
    return palette[mask]


def heatmap(scores: np.ndarray) -> np.ndarray:
    """float [H,W] in [0,1] -> RGB with a perceptual colour map."""
    return (plt.get_cmap("jet")(np.clip(scores, 0, 1))[..., :3] * 255).astype(np.uint8)


def overlay(rgb: np.ndarray, colour: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (rgb.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).astype(np.uint8)


def contact_sheet(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], cell: int = 128) -> bytes:
    """A grid PNG: one row per sample, one column per panel (all RGB uint8), titled columns."""
    n_cols = len(titles)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.9 * n_cols, 1.9 * len(rows)), squeeze=False)
    for r, panels in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(panels) and panels[c] is not None:
                ax.imshow(panels[c])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=max(60, cell // 2))
    plt.close(fig)
    return buf.getvalue()


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))
