"""From nnU-Net's preprocessed space back to raw-dataset units: intensities and geometry.

Intensities (per channel, by the plans' normalization scheme):

- ``CTNormalization``: inverted exactly, ``x * std + mean`` with the plans' foreground intensity
  statistics, so synthetic CT is in HU like the real raw data.
- ``ZScoreNormalization``, ``RescaleTo01Normalization``: per-image schemes; nnU-Net recomputes them
  for every case, so the normalised values themselves are a consistent scale and are written as is.
- ``NoNormalization``: the values are raw already.
- ``RGBTo0_1Normalization``: ``x * 255``.
- anything else (a custom scheme): written as normalised values, with a warning in the case record.

Geometry: the configuration's target spacing, identity direction, zero origin, nnU-Net's axis
order undone (``transpose_backward``). 2D configurations give one-slice 3D images whose slice
thickness is the dataset's median spacing along the slicing axis.
"""
from __future__ import annotations

import numpy as np

EXACT_INVERSE = {"CTNormalization", "NoNormalization", "RGBTo0_1Normalization"}
PER_IMAGE = {"ZScoreNormalization", "RescaleTo01Normalization"}


def to_raw_intensity(image: np.ndarray, scheme: str, properties: dict | None) -> np.ndarray:
    if scheme == "CTNormalization":
        return image * float(properties["std"]) + float(properties["mean"])
    if scheme == "RGBTo0_1Normalization":
        return image * 255.0
    return image


def raw_spacing(plans_manager, configuration_manager, spatial_dims: int) -> list[float]:
    """Spacing in transposed axis order, always 3 values."""
    spacing = [float(s) for s in configuration_manager.spacing]
    if spatial_dims == 2:
        spacing = [float(plans_manager.original_median_spacing_after_transp[0])] + spacing[-2:]
    return spacing


def to_sitk(volume: np.ndarray, spacing_transposed: list[float], transpose_backward: list[int]):
    """(3 transposed spatial axes) numpy -> SimpleITK image in raw axis order."""
    import SimpleITK as sitk
    arr = np.ascontiguousarray(np.transpose(volume, transpose_backward))
    spacing = [spacing_transposed[i] for i in transpose_backward]
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([float(s) for s in spacing[::-1]])  # numpy (z, y, x) vs ITK (x, y, z)
    return img
