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


class RawSpace:
    """Converts one generated case (normalised image + class-index labels) to raw-dataset SimpleITK images."""

    def __init__(self, plans_manager, configuration_manager, spatial_dims: int, label_values: list[int],
                 context_classes: int = 0):
        self.spatial_dims = spatial_dims
        self.spacing = raw_spacing(plans_manager, configuration_manager, spatial_dims)
        self.transpose_backward = list(plans_manager.transpose_backward)
        self.properties = plans_manager.foreground_intensity_properties_per_channel
        self.schemes = list(configuration_manager.normalization_schemes)
        # class index -> label value; 'outside' the nonzero mask and the context classes after it are background
        self.outside_class = len(label_values)
        self.value_of_class = np.array(list(label_values) + [0] * (1 + context_classes),
                                       dtype=np.uint8 if max(label_values) < 256 else np.int16)

    def convert(self, image: np.ndarray, labels: np.ndarray) -> tuple[list, object, list[str]]:
        """(C, *spatial) normalised image, (*spatial) class indices -> (channel images, label image, notes)."""
        if self.spatial_dims == 2:
            image, labels = image[:, None], labels[None]  # one-slice 3D volume
        outside = labels == self.outside_class
        channels, notes = [], []
        for c, scheme in enumerate(self.schemes):
            props = self.properties.get(str(c), self.properties.get(c))
            raw = to_raw_intensity(image[c], scheme, props).astype(np.float32)
            raw[outside] = 0.0  # nnU-Net's nonzero mask: 'outside' voxels were exactly zero in the raw data
            if scheme not in EXACT_INVERSE | PER_IMAGE:
                notes.append(f"channel {c}: unknown normalization {scheme!r}, written in normalised units")
            channels.append(to_sitk(raw, self.spacing, self.transpose_backward))
        return channels, to_sitk(self.value_of_class[labels], self.spacing, self.transpose_backward), notes
