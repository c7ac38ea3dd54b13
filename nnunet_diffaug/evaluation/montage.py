"""The PNG montage: real and synthetic slices side by side, labels and nnU-Net's reading overlaid."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nnunet_diffaug.file_io import atomic_path


def _read(path) -> np.ndarray:
    import SimpleITK as sitk
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return arr[None] if arr.ndim == 2 else arr   # 2D images as one-slice volumes


def _best_slice(label: np.ndarray) -> int:
    """The axial slice with the most labelled voxels (the middle one if all are empty)."""
    counts = (label > 0).reshape(label.shape[0], -1).sum(1)
    return int(np.argmax(counts)) if counts.any() else label.shape[0] // 2


def write_montage(rows: list[dict], path: Path, n_classes: int, title: str) -> None:
    """``rows``: dicts with 'real' and 'synthetic' {'name', 'image', 'label'} and optional 'prediction' (files)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(plt.get_cmap("tab10").colors[: max(n_classes, 1)])
    columns = ["real: image", "real: label", "synthetic: image", "synthetic: label", "synthetic: nnU-Net reads"]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.4 * len(columns), 2.4 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        real_img, real_lab = _read(row["real"]["image"]), _read(row["real"]["label"])
        syn_img, syn_lab = _read(row["synthetic"]["image"]), _read(row["synthetic"]["label"])
        zr, zs = _best_slice(real_lab), _best_slice(syn_lab)
        window = np.percentile(real_img, [1, 99])  # one window for both: brightness differences stay visible
        pred = _read(row["prediction"])[zs] if row.get("prediction") else None
        panels = [(real_img[zr], None), (real_img[zr], real_lab[zr]), (syn_img[zs], None), (syn_img[zs], syn_lab[zs]),
                  (syn_img[zs], pred)]
        for c, (img, lab) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1])
            if lab is not None:
                ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=1, vmax=max(n_classes, 1), alpha=0.45,
                          interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
        axes[r, 0].set_ylabel(f"{row['real']['name']}\n{row['synthetic']['name']}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
