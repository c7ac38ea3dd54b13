"""Attributes of class-index label maps, requests for them, and clean-up of generated maps.

Class indices follow :mod:`synthesis.data`: ``0`` is background, ``1..K-1`` the declared
foreground labels, ``K`` is nnU-Net's 'outside the nonzero region', and context classes (body
envelope, intensity clusters; :mod:`synthesis.context`), when the synthesizer has them, follow it.
The attributes a label generator is conditioned on are the volume fractions of the foreground
classes ``1..K-1``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from nnunet_diffaug.errors import DiffAugError


def volume_fractions(label_map: np.ndarray, num_foreground: int) -> np.ndarray:
    """(*spatial) class indices -> (num_foreground,) fraction of voxels of each class 1..num_foreground."""
    counts = np.bincount(np.asarray(label_map).ravel().astype(np.int64), minlength=num_foreground + 1)
    return counts[1:num_foreground + 1] / float(np.asarray(label_map).size)


def component_counts(label_map: np.ndarray, num_foreground: int) -> np.ndarray:
    """(num_foreground,) number of connected components (face connectivity) of each class 1..num_foreground."""
    from scipy.ndimage import label
    return np.array([label(label_map == k)[1] for k in range(1, num_foreground + 1)], dtype=np.int64)


def remove_small_fragments(label_map: np.ndarray, min_voxels: int, classes) -> np.ndarray:
    """Components of each class in ``classes`` smaller than ``min_voxels`` take the most common label around them.

    Why: argmax over decoded logits leaves speckles at class borders that no real label map has. Context classes
    are cleaned too: the painter paints a speck of the fat cluster as a speck of fat.
    """
    if min_voxels <= 1:
        return label_map
    from scipy.ndimage import binary_dilation, label
    out = np.array(label_map, copy=True)
    for k in classes:
        comps, n = label(out == k)
        if n == 0:
            continue
        sizes = np.bincount(comps.ravel())
        for c in np.nonzero(sizes < min_voxels)[0]:
            if c == 0:
                continue
            piece = comps == c
            ring = binary_dilation(piece) & ~piece
            around = out[ring]
            around = around[around != k]
            out[piece] = np.bincount(around).argmax() if around.size else 0
    return out


# ---------------------------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class VolumeRequest:
    """``--volume CLASS=LOW:HIGH``: the fraction of the map that class ``class_index`` should fill."""
    class_index: int
    label_name: str
    low: float
    high: float

    def to_json(self) -> dict:
        return {"class": self.label_name, "low": self.low, "high": self.high}


def parse_volume_requests(specs: list[str] | None, label_names: dict[str, int], label_values: list[int],
                          flag: str = "--volume") -> list[VolumeRequest]:
    """Parses ``CLASS=LOW:HIGH`` strings; CLASS is a label name or value of dataset.json, not background."""
    requests: dict[int, VolumeRequest] = {}
    name_of_value = {v: n for n, v in label_names.items()}
    for spec in specs or []:
        m = re.fullmatch(r"\s*([^=]+?)\s*=\s*([^:]+?)\s*:\s*(.+?)\s*", spec)
        if not m:
            raise DiffAugError(f"{flag} {spec!r}: expected CLASS=LOW:HIGH, e.g. {flag} liver=0.05:0.10.")
        cls, lo, hi = m.groups()
        if cls in label_names:
            value = label_names[cls]
        elif cls.lstrip("-").isdigit() and int(cls) in name_of_value:
            value = int(cls)
        else:
            raise DiffAugError(f"{flag} {spec!r}: unknown class {cls!r}; known labels: "
                               f"{', '.join(f'{n}={v}' for n, v in label_names.items() if v != 0)}.")
        if value == 0:
            raise DiffAugError(f"{flag} {spec!r}: background is what is left over; ask for foreground classes.")
        try:
            low, high = float(lo), float(hi)
        except ValueError:
            raise DiffAugError(f"{flag} {spec!r}: LOW and HIGH must be numbers.") from None
        if not (0.0 <= low <= 1.0 and 0.0 <= high <= 1.0):
            raise DiffAugError(f"{flag} {spec!r}: fractions must lie in [0, 1] (they are shares of the volume).")
        if low > high:
            raise DiffAugError(f"{flag} {spec!r}: LOW {low} is greater than HIGH {high}.")
        index = label_values.index(value)
        if index in requests:
            raise DiffAugError(f"{flag}: class {cls!r} is given twice.")
        requests[index] = VolumeRequest(index, name_of_value[value], low, high)
    return [requests[k] for k in sorted(requests)]


def draw_attributes(requests: list[VolumeRequest], training_attributes: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """One attribute vector: a training map's measured fractions, with the requested classes drawn uniformly
    in their ranges. Unrequested classes thereby follow the training distribution (jointly)."""
    attrs = np.array(training_attributes[rng.integers(len(training_attributes))], dtype=np.float64)
    for r in requests:
        attrs[r.class_index - 1] = rng.uniform(r.low, r.high)
    return attrs
