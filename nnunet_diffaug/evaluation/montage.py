"""The PNG montage: real and synthetic slices side by side, labels and nnU-Net's reading overlaid.

For inpainted sets (same grid as their source case) one slice is shown through both: the source, the
edited label map, the result and what changed, so the repainted structure and any seam are visible."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nnunet_diffaug.evaluation.inpainting import repainted_region
from nnunet_diffaug.file_io import atomic_path


def _read(path) -> np.ndarray:
    import SimpleITK as sitk
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return arr[None] if arr.ndim == 2 else arr   # 2D images as one-slice volumes


def _best_slice(label: np.ndarray) -> int:
    """The axial slice with the most labelled voxels (the middle one if all are empty)."""
    counts = (label > 0).reshape(label.shape[0], -1).sum(1)
    return int(np.argmax(counts)) if counts.any() else label.shape[0] // 2


def _most_changed_slice(region: np.ndarray, syn_label: np.ndarray, src_label: np.ndarray) -> int:
    """The axial slice where most of the inpainted image was repainted (where only labels changed, the one
    where they changed most)."""
    for changed in (region, syn_label != src_label):
        counts = changed.reshape(changed.shape[0], -1).sum(1)
        if counts.any():
            return int(np.argmax(counts))
    return _best_slice(syn_label)


def _panels(row: dict, same_grid: bool, clip: tuple[float, float] | None = None) -> list[tuple]:
    """(image, label overlay, intensity window, colour map) per column of one row. ``clip``: the raw range
    CT normalisation clipped the source to (inpainted cases hold it clipped outside the region)."""
    real_img, real_lab = _read(row["real"]["image"]), _read(row["real"]["label"])
    syn_img, syn_lab = _read(row["synthetic"]["image"]), _read(row["synthetic"]["label"])
    if same_grid and syn_img.shape == real_img.shape:
        region, real_img = repainted_region(syn_img, real_img, clip)  # the source as the case holds it
        window = np.percentile(real_img, [1, 99])
        z = _most_changed_slice(region, syn_lab, real_lab)
        diff = syn_img[z].astype(np.float64) - real_img[z]
        half = max(float(np.abs(diff).max()), 1e-6)
        return [(real_img[z], None, window, "gray"), (real_img[z], real_lab[z], window, "gray"),
                (real_img[z], syn_lab[z], window, "gray"), (syn_img[z], None, window, "gray"),
                (diff, None, (-half, half), "coolwarm")]
    window = np.percentile(real_img, [1, 99])  # one window for both: brightness differences stay visible
    zr, zs = _best_slice(real_lab), _best_slice(syn_lab)
    pred = _read(row["prediction"])[zs] if row.get("prediction") else None
    return [(real_img[zr], None, window, "gray"), (real_img[zr], real_lab[zr], window, "gray"),
            (syn_img[zs], None, window, "gray"), (syn_img[zs], syn_lab[zs], window, "gray"),
            (syn_img[zs], pred, window, "gray")]


def write_montage(rows: list[dict], path: Path, n_classes: int, title: str, inpainted: bool = False,
                  clip: tuple[float, float] | None = None) -> None:
    """``rows``: dicts with 'real' and 'synthetic' {'name', 'image', 'label'} and optional 'prediction' (files).
    ``inpainted``: the synthetic cases lie on their real (source) case's grid; one slice through both is shown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(plt.get_cmap("tab10").colors[: max(n_classes, 1)])
    columns = (["source: image", "source: label", "edited label", "inpainted: image", "inpainted - source"]
               if inpainted else
               ["real: image", "real: label", "synthetic: image", "synthetic: label", "synthetic: nnU-Net reads"])
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.4 * len(columns), 2.4 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, (img, lab, (low, high), colours) in enumerate(_panels(row, inpainted, clip)):
            ax = axes[r, c]
            ax.imshow(img, cmap=colours, vmin=low, vmax=high)
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
