"""PNG outputs of a training run: loss curves and montages of samples with the label map overlaid."""
from __future__ import annotations

import os

import numpy as np

from nnunet_diffaug.file_io import atomic_path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def smooth(values: list[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if len(v) < window or window < 2:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def plot_losses(path: str | os.PathLike, series: dict[str, list[float]], title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in series.items():
        steps = np.array([i for i, v in enumerate(values) if v is not None])  # None: not measured at that step
        values = [v for v in values if v is not None]
        if not values:
            continue
        w = max(1, len(values) // 50)
        s = smooth(values, w)
        ax.plot(steps[w - 1:w - 1 + len(s)], s, label=f"{name} (moving mean of {w})")
    if all(v > 0 for vals in series.values() for v in vals if v is not None):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def middle_slice(volume: np.ndarray) -> np.ndarray:
    """(*spatial) -> 2D: the middle slice along the first axis of a 3D volume."""
    return volume[volume.shape[0] // 2] if volume.ndim == 3 else volume


def save_montage(path: str | os.PathLike, rows: list[tuple[str, list[np.ndarray]]], labels: list[np.ndarray],
                 num_classes: int, title: str, vmin: float | None = None, vmax: float | None = None) -> None:
    """One column per sample, one row per entry of ``rows``, plus a last row: the last images with
    their label map overlaid (background left clear). Images are (*spatial), first channel."""
    plt = _pyplot()
    n = len(labels)
    all_rows = rows + [(rows[-1][0] + " + labels", rows[-1][1])]
    fig, axes = plt.subplots(len(all_rows), n, figsize=(2.2 * n, 2.3 * len(all_rows)), squeeze=False)
    cmap = plt.get_cmap("tab10", max(num_classes, 2))
    for r, (row_name, images) in enumerate(all_rows):
        for i in range(n):
            ax = axes[r, i]
            ax.imshow(middle_slice(images[i]), cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            if r == len(all_rows) - 1:
                lb = middle_slice(labels[i])
                ax.imshow(np.ma.masked_where(lb == 0, lb), cmap=cmap, vmin=0, vmax=max(num_classes - 1, 1),
                          alpha=0.45, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(row_name)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
