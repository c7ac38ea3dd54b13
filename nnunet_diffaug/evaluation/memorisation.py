"""Memorisation: is a synthetic case a near-copy of a training case the generator saw?

Image distance = 1 - normalised cross-correlation (Pearson r over all voxels and channels) on a
coarse common grid, so it ignores global intensity scaling and voxel noise but not anatomy.

Texture distance = the same after removing, from both images, what the training case's label map
explains (per channel, a least-squares fit on its coarse class fractions: the class means). A
synthetic image painted on a training case's label map (``--labels real`` / ``real-aligned``) is
close in image distance by design, but its texture inside the classes is new; a copied image shares
that texture too.

Each synthetic case's nearest training case is compared with how close distinct real training
cases are to each other (leave-one-case-out nearest neighbours). A case is flagged as a near-copy
when it is closer to a training case than almost any two real cases are, in image distance *and*
in texture distance; close in image distance only is reported as reused anatomy.
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


def coarse_fractions(label: np.ndarray, classes: list[int], max_side: int = 32) -> np.ndarray:
    """(1, *spatial) label map -> (len(classes), *coarse) share of each class per coarse voxel (grid of ``coarse``)."""
    one_hot = np.stack([label[0] == c for c in classes]).astype(np.float32)
    return coarse(one_hot, max_side)


def ncc_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - Pearson r between every row of ``a`` and of ``b`` (rows: flattened images)."""
    def unit(x):
        x = x - x.mean(1, keepdims=True)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return 1.0 - unit(a) @ unit(b).T


def label_bases(fractions: np.ndarray) -> np.ndarray:
    """(m, K, V) class fractions -> (m, V, K + 1): orthonormal bases of the maps each label map spans, constant
    included (so residuals have zero mean); columns beyond the rank are zero."""
    maps = np.concatenate([fractions, np.ones_like(fractions[:, :1])], axis=1).astype(np.float64)
    u, sv, _ = np.linalg.svd(np.swapaxes(maps, 1, 2), full_matrices=False)
    return u * (sv > 1e-6 * sv[:, :1])[:, None, :]


def remove_label_part(x: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """(C, V) image minus, per channel, its least-squares fit on a label map (``basis``): the class means."""
    return x - (x @ basis) @ basis.T


def texture_distances(a: np.ndarray, b: np.ndarray, b_fractions: np.ndarray, chunk: int = 32) -> np.ndarray:
    """1 - Pearson r between every image of ``a`` and of ``b`` after removing from both what the label map of
    the ``b`` image explains. a: (n, C, V), b: (m, C, V), b_fractions: (m, K, V) -> (n, m).

    With P_j the projection on b_j's label maps: r(a, b_j) = <a, (I-P_j) b_j> / (|(I-P_j) a| |(I-P_j) b_j|) and
    |(I-P_j) a|^2 = |a|^2 - |P_j a|^2, so no residual of ``a`` is ever formed; ``b`` goes in chunks (memory).
    """
    a = a.astype(np.float64)
    flat_a, a_by_channel = a.reshape(len(a), -1), a.reshape(-1, a.shape[-1])
    out = np.empty((len(a), len(b)))
    for start in range(0, len(b), chunk):
        bases = label_bases(b_fractions[start:start + chunk])                           # (mc, V, K + 1)
        rb = np.stack([remove_label_part(x, q) for x, q in zip(b[start:start + chunk].astype(np.float64), bases)])
        rb = rb.reshape(len(bases), -1)
        projected = (a_by_channel @ np.concatenate(list(bases), axis=1)).reshape(len(a), a.shape[1], len(bases), -1)
        norms_a = (flat_a ** 2).sum(1)[:, None] - (projected ** 2).sum((1, 3))
        norms_b = (rb ** 2).sum(1)[None]
        out[:, start:start + len(bases)] = 1.0 - (flat_a @ rb.T) / np.sqrt(np.maximum(norms_a, 1e-12) *
                                                                         np.maximum(norms_b, 1e-12))
    return out


def _nearest_real(d_tt: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each training item's nearest distance to an item of another case (leave-one-case-out)."""
    d = d_tt.copy()
    d[groups[:, None] == groups[None, :]] = np.inf
    nearest = d.min(1)
    return nearest[np.isfinite(nearest)]


def _threshold(real_nearest: np.ndarray, percentile: float) -> float:
    return float(np.percentile(real_nearest, percentile)) if len(real_nearest) else float("nan")


def _below(d: float, threshold: float, absolute: float) -> bool:
    return bool(d < absolute or (np.isfinite(threshold) and d < threshold))


def _stats(values, prefix: str) -> dict:
    values = np.asarray(values, dtype=float)
    return {f"{prefix}_median": float(np.median(values)) if len(values) else float("nan"),
            f"{prefix}_min": float(np.min(values)) if len(values) else float("nan")}


def memorisation_report(synthetic: dict[str, np.ndarray], training: dict[str, np.ndarray],
                        training_fractions: dict[str, np.ndarray],
                        synthetic_groups: list[str], training_groups: list[str],
                        percentile: float = DEFAULT_PERCENTILE, absolute: float = DEFAULT_ABSOLUTE) -> dict:
    """``synthetic``/``training``: item name -> coarse image (C, *coarse); ``training_fractions``: training item
    name -> its label map's ``coarse_fractions``; ``*_groups``: the case of each item.

    Items are volumes (3D models) or slices (2d models); a case's distance is its closest item's.
    """
    def stack(items, names):  # -> (items, channels, voxels)
        return np.stack([items[k].reshape(len(items[k]), -1) for k in names])
    s, t, f = stack(synthetic, synthetic), stack(training, training), stack(training_fractions, training)
    groups = np.array(training_groups)
    d_st = ncc_distances(s.reshape(len(s), -1), t.reshape(len(t), -1))
    d_tt = ncc_distances(t.reshape(len(t), -1), t.reshape(len(t), -1))
    tex_st, tex_tt = texture_distances(s, t, f), texture_distances(t, t, f)
    real_nn, real_tex_nn = _nearest_real(d_tt, groups), _nearest_real(tex_tt, groups)
    threshold, tex_threshold = _threshold(real_nn, percentile), _threshold(real_tex_nn, percentile)

    per_case: dict[str, dict] = {}
    for i, case in enumerate(synthetic_groups):
        j, k = int(np.argmin(d_st[i])), int(np.argmin(tex_st[i]))
        rec = per_case.setdefault(case, {"distance": np.inf, "texture_distance": np.inf})
        if d_st[i, j] < rec["distance"]:
            rec.update(nearest_training_case=training_groups[j], distance=float(d_st[i, j]))
        if tex_st[i, k] < rec["texture_distance"]:
            rec.update(texture_nearest_training_case=training_groups[k], texture_distance=float(tex_st[i, k]))
    for rec in per_case.values():
        close = _below(rec["distance"], threshold, absolute)
        rec["flagged"] = close and _below(rec["texture_distance"], tex_threshold, absolute)
        rec["reused_anatomy"] = close and not rec["flagged"]
    records = per_case.values()
    return {
        "distance": "1 - normalised cross-correlation on a coarse common grid; texture distance: the same after "
                    "removing what the training case's label map explains (its class means)",
        **_stats([r["distance"] for r in records], "synthetic_nearest"),
        **_stats(real_nn, "real_nearest"),
        **_stats([r["texture_distance"] for r in records], "synthetic_texture_nearest"),
        **_stats(real_tex_nn, "real_texture_nearest"),
        "threshold_percentile": percentile,
        "threshold_from_real": threshold,
        "texture_threshold_from_real": tex_threshold,
        "threshold_absolute": absolute,
        "flagged": sorted(c for c, r in per_case.items() if r["flagged"]),
        "reused_anatomy": sorted(c for c, r in per_case.items() if r["reused_anatomy"]),
        "per_case": per_case,
    }
