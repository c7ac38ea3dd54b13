"""Images on one common grid: what the image-comparison metrics (diversity, memorisation) compare.

Items are what the model sees: whole volumes for 3D configurations, axial slices for ``2d``.
Intensities are nnU-Net-normalised, then mapped to [0, 1] with the real cases' 0.5-99.5
percentiles per channel (SSIM needs a known data range); shapes are centre-cropped/padded to the
median item shape (padding = 0, the darkest real intensity).
"""
from __future__ import annotations

import numpy as np


def items_of(data: np.ndarray, spatial_dims: int) -> list[np.ndarray]:
    """(C, Z, Y, X) preprocessed case -> [the volume] (3D) or its axial slices (2d)."""
    if spatial_dims == 2:
        return [data[:, z] for z in range(data.shape[1])]
    return [data]


def intensity_range(real_items: list[np.ndarray], low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """(C, 2) per-channel percentiles over all real items."""
    n_channels = real_items[0].shape[0]
    return np.array([np.percentile(np.concatenate([x[c].ravel() for x in real_items]), [low, high])
                     for c in range(n_channels)])


def to_unit_range(item: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    lo, hi = ranges[:, 0], ranges[:, 1]
    shape = (-1,) + (1,) * (item.ndim - 1)
    return np.clip((item - lo.reshape(shape)) / np.maximum(hi - lo, 1e-6).reshape(shape), 0.0, 1.0).astype(np.float32)


def common_shape(items: list[np.ndarray]) -> tuple[int, ...]:
    return tuple(int(v) for v in np.median(np.array([x.shape[1:] for x in items]), axis=0).round())


def to_shape(item: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    from monai.transforms import ResizeWithPadOrCrop
    return np.asarray(ResizeWithPadOrCrop(spatial_size=shape, mode="constant", value=0.0)(item))
