"""Label statistics: does the synthetic set have the real per-class volumes and fragmentation?

Computed on the raw label maps (raw geometry, exact): per case and class, the volume fraction
(robust to different field-of-view sizes) and the number of connected components. Sets are
compared with the Wasserstein-1 distance between the per-case distributions.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import wasserstein_distance


def read_label(path: str) -> np.ndarray:
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def case_label_stats(label: np.ndarray, classes: list[int]) -> dict:
    """{class: {'fraction': f, 'components': n}} for one label map (full connectivity)."""
    structure = ndimage.generate_binary_structure(label.ndim, label.ndim)
    out = {}
    for c in classes:
        mask = label == c
        out[c] = {"fraction": float(mask.mean()),
                  "components": int(ndimage.label(mask, structure=structure)[1]) if mask.any() else 0}
    return out


def _w1(a: list[float], b: list[float]) -> float:
    return float(wasserstein_distance(a, b)) if a and b else float("nan")


def label_stats_report(stats: dict[str, list[dict]], classes: list[int]) -> dict:
    """``stats``: {'synthetic', 'training', 'validation'} -> list of per-case dicts from ``case_label_stats``.

    Target: the held-out validation cases; reference: the training cases against the same target.
    """
    per_class = {}
    for c in classes:
        col = {k: {m: [s[c][m] for s in v] for m in ("fraction", "components")} for k, v in stats.items()}
        row = {}
        for m in ("fraction", "components"):
            row[f"{m}_mean"] = {k: float(np.mean(col[k][m])) for k in col}
            row[f"{m}_w1_synthetic_vs_validation"] = _w1(col["synthetic"][m], col["validation"][m])
            row[f"{m}_w1_training_vs_validation"] = _w1(col["training"][m], col["validation"][m])
        row["cases_without_class"] = {k: int(sum(f == 0 for f in col[k]["fraction"])) for k in col}
        per_class[str(c)] = row

    def mean_over_classes(key):
        return float(np.nanmean([r[key] for r in per_class.values()]))
    return {
        "per_class": per_class,
        "mean_fraction_w1_synthetic_vs_validation": mean_over_classes("fraction_w1_synthetic_vs_validation"),
        "mean_fraction_w1_training_vs_validation": mean_over_classes("fraction_w1_training_vs_validation"),
        "mean_components_w1_synthetic_vs_validation": mean_over_classes("components_w1_synthetic_vs_validation"),
        "mean_components_w1_training_vs_validation": mean_over_classes("components_w1_training_vs_validation"),
    }
