"""Memorisation: is a synthetic case a near-copy of a training case the generator saw?

Distance = 1 - normalised cross-correlation (Pearson r over all voxels and channels) on a coarse
common grid, so it ignores global intensity scaling and voxel noise but not anatomy. Each synthetic
case's nearest training case is compared with how close distinct real training cases are to each
other (leave-one-case-out nearest neighbours): a synthetic case closer to a training case than
almost any two real cases are to each other is flagged.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_PERCENTILE = 5.0
DEFAULT_ABSOLUTE = 0.01   # r >= 0.99 with a training case: a copy up to noise and intensity scaling


def coarse(image: np.ndarray, max_side: int = 32) -> np.ndarray:
    """(C, *spatial) -> area-averaged onto at most ``max_side`` voxels per axis (same grid for equal shapes)."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    size = tuple(min(s, max_side) for s in image.shape[1:])
    pool = F.adaptive_avg_pool3d if image.ndim == 4 else F.adaptive_avg_pool2d
    return pool(x, size)[0].numpy()


def ncc_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - Pearson r between every row of ``a`` and of ``b`` (rows: flattened images)."""
    def unit(x):
        x = x - x.mean(1, keepdims=True)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return 1.0 - unit(a) @ unit(b).T


def memorisation_report(synthetic: dict[str, np.ndarray], training: dict[str, np.ndarray],
                        synthetic_groups: list[str], training_groups: list[str],
                        percentile: float = DEFAULT_PERCENTILE, absolute: float = DEFAULT_ABSOLUTE) -> dict:
    """``synthetic``/``training``: item name -> coarse image (flattened inside); ``*_groups``: the case of each item.

    Items are volumes (3D models) or slices (2d models); a case's distance is its closest item's.
    """
    s_names, t_names = list(synthetic), list(training)
    s = np.stack([synthetic[k].ravel() for k in s_names])
    t = np.stack([training[k].ravel() for k in t_names])
    d_st = ncc_distances(s, t)
    d_tt = ncc_distances(t, t)
    t_groups = np.array(training_groups)
    d_tt[t_groups[:, None] == t_groups[None, :]] = np.inf  # leave the item's own case out
    real_nn = d_tt.min(1)
    real_nn = real_nn[np.isfinite(real_nn)]
    threshold_pct = float(np.percentile(real_nn, percentile)) if len(real_nn) else float("nan")

    per_case: dict[str, dict] = {}
    for i, case in enumerate(synthetic_groups):
        j = int(np.argmin(d_st[i]))
        d = float(d_st[i, j])
        if case not in per_case or d < per_case[case]["distance"]:
            per_case[case] = {"nearest_training_case": training_groups[j], "distance": d}
    for rec in per_case.values():
        rec["flagged"] = bool(rec["distance"] < absolute or (np.isfinite(threshold_pct) and
                                                            rec["distance"] < threshold_pct))
    flagged = sorted(c for c, r in per_case.items() if r["flagged"])
    dists = [r["distance"] for r in per_case.values()]
    return {
        "distance": "1 - normalised cross-correlation on a coarse common grid",
        "synthetic_nearest_median": float(np.median(dists)),
        "synthetic_nearest_min": float(np.min(dists)),
        "real_nearest_median": float(np.median(real_nn)) if len(real_nn) else float("nan"),
        "real_nearest_min": float(np.min(real_nn)) if len(real_nn) else float("nan"),
        "threshold_percentile": percentile,
        "threshold_from_real": threshold_pct,
        "threshold_absolute": absolute,
        "flagged": flagged,
        "per_case": per_case,
    }
