"""Diversity: mean pairwise MS-SSIM within a set (high = the cases look alike; a collapsed generator
scores close to 1). MONAI's MultiScaleSSIMMetric, with a kernel and number of scales chosen to fit the
images: its defaults (kernel 11, 5 scales) need > 160 voxels per side.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch
from tqdm import tqdm

# MONAI's default MS-SSIM weights (Wang et al. 2003); the first ``scales`` are used, renormalised
_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@dataclass
class SSIMSettings:
    spatial_dims: int          # 3 = whole volumes; 2 = per slice along the thinnest axis
    kernel_size: tuple[int, ...]
    scales: int

    def as_dict(self) -> dict:
        return {"spatial_dims": self.spatial_dims, "kernel_size": list(self.kernel_size), "scales": self.scales}


def _fits(shape, kernel, scales) -> bool:
    # each scale halves every axis (MONAI pools once more after the last scale); the kernel must fit
    # the coarsest scale, and MONAI itself checks size // (scales - 1)^2 > kernel - 1
    div = max(1, scales - 1) ** 2
    return all(s // 2 ** (scales - 1) >= k and s >= 2 ** scales and s // div > k - 1 for s, k in zip(shape, kernel))


def _best(shape: tuple[int, ...], min_scales: int) -> SSIMSettings | None:
    # a larger kernel first (small ones are noise-sensitive at the finest scale), then more scales
    for k in (7, 5, 3):
        for scales in range(5, min_scales - 1, -1):
            kernel = tuple(k if s >= 16 else 1 for s in shape)  # thin axes: compare within slices
            if any(kk > 1 for kk in kernel) and _fits(shape, kernel, scales):
                return SSIMSettings(len(shape), kernel, scales)
    return None


def choose_settings(shape: tuple[int, ...]) -> SSIMSettings:
    """A kernel (<= 7) and number of scales (<= 5) that fit ``shape`` (spatial only).

    Whole images with at least 3 scales if they fit; else per slice along the thinnest axis (a
    thin stack of slices cannot be downsampled 3 times); else 2 scales; else single-scale SSIM.
    """
    thin = int(np.argmin(shape))
    in_slice = tuple(s for i, s in enumerate(shape) if i != thin) if len(shape) == 3 else tuple(shape)
    for sub_shape, min_scales in ((tuple(shape), 3), (in_slice, 3), (tuple(shape), 2)):
        found = _best(sub_shape, min_scales)
        if found is not None:
            return found
    odd_kernel = tuple(max(1, min(7, s - (1 - s % 2))) for s in in_slice)  # largest odd window that fits
    return SSIMSettings(len(in_slice), odd_kernel, 1)


def _metric(settings: SSIMSettings):
    from monai.metrics import MultiScaleSSIMMetric, SSIMMetric
    sigma = [max(0.5, k / 4.0) for k in settings.kernel_size]
    if settings.scales == 1:
        return SSIMMetric(spatial_dims=settings.spatial_dims, data_range=1.0, win_size=settings.kernel_size,
                          kernel_sigma=sigma)
    w = np.array(_WEIGHTS[: settings.scales])
    return MultiScaleSSIMMetric(spatial_dims=settings.spatial_dims, data_range=1.0,
                                kernel_size=settings.kernel_size, kernel_sigma=sigma,
                                weights=tuple((w / w.sum()).tolist()))


def _as_batch(images: list[np.ndarray], settings: SSIMSettings) -> torch.Tensor:
    """(n, C, *spatial) images -> the layout MONAI wants; 2D mode folds the thinnest axis into the batch."""
    x = torch.from_numpy(np.stack(images)).float()
    if settings.spatial_dims == x.ndim - 2:
        return x
    thin = 2 + int(np.argmin(x.shape[2:]))
    x = x.movedim(thin, 1)                           # (n, slices, C, *rest)
    return x


def pairwise_ms_ssim(images: list[np.ndarray], groups: list[str] | None = None, settings: SSIMSettings | None = None,
                     max_pairs: int = 2000, desc: str = "MS-SSIM") -> dict:
    """Mean MS-SSIM over pairs of ``images`` ((C, *spatial), same shape, values in [0, 1]).

    Pairs from the same ``groups`` entry (slices of one case) are skipped: they measure within-case
    similarity, not diversity between cases. At most ``max_pairs`` pairs, spread evenly.
    """
    groups = groups or [str(i) for i in range(len(images))]
    pairs = [(i, j) for i, j in combinations(range(len(images)), 2) if groups[i] != groups[j]]
    if not pairs:
        return {"mean": float("nan"), "std": float("nan"), "pairs": 0}
    if len(pairs) > max_pairs:
        pairs = [pairs[k] for k in np.unique(np.linspace(0, len(pairs) - 1, max_pairs).round().astype(int))]
    settings = settings or choose_settings(images[0].shape[1:])
    metric = _metric(settings)
    batch = _as_batch(images, settings)
    values = []
    for i, j in tqdm(pairs, desc=desc, leave=False, dynamic_ncols=True):
        a, b = batch[i], batch[j]
        if settings.spatial_dims == batch.ndim - 2:
            a, b = a[None], b[None]
        values.append(float(metric(a, b).mean()))  # 2D mode: the mean over the slices of the pair
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "pairs": len(values)}
