"""Metrics for inpainted synthetic sets (``diffaug_synthesize --labels inpaint``): how much was repainted,
whether a seam shows at the border of the repainted region, and whether the judge reads the edited labels
inside it.

An inpainted case lies on its source case's grid and equals it outside the repainted region, so the region
is where the two raw images differ: outside it the written image is the source as nnU-Net normalised it,
converted back to raw units, so CT sources are first clipped to the plans' normalisation range (voxels
beyond it, e.g. air at -3000 HU, would otherwise count as changed) and float rounding is tolerated. Per case:

- ``changed_share``: the share of voxels whose intensity differs from the source case;
- ``border_gradient_ratio``: mean gradient magnitude on the region's one-voxel outer border in the
  synthetic image, divided by the same in the source image at the same voxels: 1 means the repainted
  region joins the real image as smoothly as the real tissue there did; well above 1 is a visible seam;
- ``region_dice``: Dice of the judge's segmentation against the case's own (edited) labels inside the
  region, per foreground class present there, and their mean.
"""
from __future__ import annotations

import numpy as np


def _read(path) -> np.ndarray:
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)


def _gradient_magnitude(image: np.ndarray) -> np.ndarray:
    return np.sqrt(sum(g ** 2 for g in np.gradient(image)))


# float32 round trip raw -> normalised -> raw: differences far below this share of the intensity range
ROUNDING_TOLERANCE = 1e-4


def repainted_region(synthetic: np.ndarray, source: np.ndarray,
                     clip: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(region, kept source) of an inpainted case and its source image, on one grid.

    ``region``: the voxels that differ from the source beyond float rounding. Kept voxels hold the source
    either as read or, with ``clip`` (the raw range CT normalisation clipped it to), as clipped; the kept
    source is the source with those clipped values, the image the case was cut from."""
    synthetic, source = np.asarray(synthetic, np.float64), np.asarray(source, np.float64)
    clipped = source if clip is None else np.clip(source, *clip)
    tolerance = ROUNDING_TOLERANCE * max(float(np.ptp(clipped)), 1.0)
    kept_as_clipped = np.abs(synthetic - clipped) <= tolerance
    region = (np.abs(synthetic - source) > tolerance) & ~kept_as_clipped
    return region, np.where(kept_as_clipped, clipped, source)


def case_metrics(synthetic_image, source_image, labels, prediction, foreground: list[int],
                 clip: tuple[float, float] | None = None) -> dict:
    """The three metrics of one case from raw arrays (first channel), all on the source case's grid.
    ``clip``: the (low, high) raw range the first channel was clipped to before normalisation (CT)."""
    from scipy import ndimage
    syn, src = _read(synthetic_image), _read(source_image)
    if syn.shape != src.shape:
        return {"note": f"not on its source case's grid ({syn.shape} vs {src.shape}): not an inpainted case"}
    region, src = repainted_region(syn, src, clip)
    out = {"changed_share": float(region.mean()), "changed_voxels": int(region.sum())}
    if not region.any():
        return out
    border = ndimage.binary_dilation(region, iterations=1) & ~region
    g_syn, g_src = _gradient_magnitude(syn)[border].mean(), _gradient_magnitude(src)[border].mean()
    out["border_gradient_ratio"] = float(g_syn / g_src) if g_src > 0 else None
    lab, pred = _read(labels).astype(int), _read(prediction).astype(int)
    dice = {}
    for c in foreground:
        ref, hit = (lab == c) & region, (pred == c) & region
        if ref.any():
            dice[str(c)] = float(2 * (ref & hit).sum() / (ref.sum() + hit.sum()))
    out["region_dice"] = dice
    out["region_mean_dice"] = float(np.mean(list(dice.values()))) if dice else None
    return out


def inpainting_report(synthetic_cases: dict, source_cases: dict[str, str | None], real_cases: dict,
                      predictions: dict, foreground: list[int], clip: tuple[float, float] | None = None) -> dict:
    """Per-case metrics and their means, for the cases whose record names a real source case
    (``source_cases``: synthetic case -> its record's source case)."""
    per_case = {}
    for cid, case in sorted(synthetic_cases.items()):
        source = source_cases.get(cid)
        if source not in real_cases or cid not in predictions:
            continue
        per_case[cid] = {"source_case": source, **case_metrics(case["images"][0], real_cases[source]["images"][0],
                                                              case["label"], predictions[cid], foreground, clip)}

    def mean(key):
        values = [r[key] for r in per_case.values() if r.get(key) is not None]
        return float(np.mean(values)) if values else None
    return {"cases": len(per_case), "mean_changed_share": mean("changed_share"),
            "mean_border_gradient_ratio": mean("border_gradient_ratio"),
            "mean_region_dice": mean("region_mean_dice"), "per_case": per_case}
