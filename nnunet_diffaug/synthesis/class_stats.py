"""Per-class intensity statistics: what the image model is told about each structure's appearance.

Why: a label-conditioned model that sees only the label map paints a class with whatever its
training cases averaged, and small or variable structures (ribs, a spleen beside a liver) come out
looking like their surroundings. A segmenter trained on such cases learns that a label can sit on
tissue that does not look like it. So the model also sees, on each class's voxels, that class's
mean and sd of the normalised image, per channel, taken from a real case.

Statistics of a case: an array (classes, channels, 2) holding mean and sd of nnU-Net's normalised
image over each class's voxels of the WHOLE case (3D volume; 2D configurations use the whole
source volume too, so the slices of one case agree). A class absent from the case is a NaN row.

Condition channels (``2 * C + 1``): the mean map and the sd map of every channel, plus a flag map
that is 1 where statistics are given. Dropped or unknown statistics are all zeros, flag included,
so "no statistics" is never confused with a mean of 0 (the average of a z-scored image).
"""
from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.synthesis.rawspace import to_raw_intensity


def stats_channels_count(image_channels: int) -> int:
    return 2 * image_channels + 1


def case_class_stats(image: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, *spatial) normalised image, (*spatial) class indices -> (num_classes, C, 2) mean and sd.

    Classes without voxels get NaN rows."""
    lab = np.asarray(labels).ravel().astype(np.int64)
    counts = np.bincount(lab, minlength=num_classes)[:num_classes].astype(np.float64)
    out = np.full((num_classes, len(image), 2), np.nan, dtype=np.float32)
    present = counts > 0
    for c, channel in enumerate(image):
        x = np.asarray(channel, dtype=np.float64).ravel()
        total = np.bincount(lab, weights=x, minlength=num_classes)[:num_classes]
        total_sq = np.bincount(lab, weights=x * x, minlength=num_classes)[:num_classes]
        mean = total[present] / counts[present]
        out[present, c, 0] = mean
        out[present, c, 1] = np.sqrt(np.maximum(total_sq[present] / counts[present] - mean * mean, 0.0))
    return out


def stats_maps(labels: torch.Tensor, stats: torch.Tensor | None, image_channels: int) -> torch.Tensor:
    """(B, 1, *spatial) class indices + (B, K, C, 2) statistics (NaN rows: unknown) -> (B, 2C+1, *spatial).

    ``stats`` None: no statistics for any sample (all zeros)."""
    b, spatial = labels.shape[0], labels.shape[2:]
    n = stats_channels_count(image_channels)
    if stats is None:
        return torch.zeros((b, n, *spatial), dtype=torch.float32, device=labels.device)
    stats = stats.to(labels.device, torch.float32)
    known = torch.isfinite(stats).flatten(2).all(dim=2, keepdim=True)          # (B, K, 1)
    values = torch.nan_to_num(stats.permute(0, 1, 3, 2).flatten(2))            # (B, K, 2C): means, then sds
    table = torch.where(known, torch.cat([values, torch.ones_like(known, dtype=values.dtype)], dim=2),
                        0.0)                                                   # (B, K, 2C+1)
    index = labels.long().flatten(1).unsqueeze(1).expand(-1, n, -1)            # (B, 2C+1, N)
    return torch.gather(table.transpose(1, 2), 2, index).view(b, n, *spatial)


def between_case_sd(stats: np.ndarray) -> np.ndarray:
    """(cases, K, C, 2) -> (K, C): the spread of each class's mean over cases (0 with fewer than 2 cases)."""
    means = stats[..., 0]
    counts = np.isfinite(means).sum(axis=0)
    with _quiet_nan_warnings():
        sd = np.nanstd(means, axis=0, ddof=1)
    return np.where(counts >= 2, np.nan_to_num(sd), 0.0)


@contextlib.contextmanager
def _quiet_nan_warnings():
    """numpy warns on all-NaN slices (a class absent from every case); callers handle those."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def normalised_value(raw: float, scheme: str, properties: dict | None) -> float:
    """Inverse of :func:`rawspace.to_raw_intensity` (affine per channel): raw-dataset units -> normalised."""
    offset = float(to_raw_intensity(np.float64(0.0), scheme, properties))
    slope = float(to_raw_intensity(np.float64(1.0), scheme, properties)) - offset
    return (raw - offset) / slope


def parse_intensity_requests(requests: list[str] | None, names: dict[str, int], label_values: list[int],
                             num_channels: int) -> dict[int, list[float]]:
    """``CLASS=MEAN`` (or ``CLASS=M0,M1,..`` per channel) -> {class index: raw means}. CLASS: label name or value."""
    out: dict[int, list[float]] = {}
    for text in requests or []:
        cls, sep, value = text.partition("=")
        cls = cls.strip()
        if not sep or not cls:
            raise DiffAugError(f"--class-intensity {text!r}: write CLASS=MEAN (label name or value = mean in the "
                               f"synthetic raw images' units).")
        value_of = names.get(cls)
        if value_of is None and cls.lstrip("-").isdigit():
            value_of = int(cls)
        if value_of not in label_values:
            raise DiffAugError(f"--class-intensity {text!r}: {cls!r} is not a label of this dataset "
                               f"({', '.join(f'{k}={v}' for k, v in names.items())}).")
        try:
            means = [float(v) for v in value.split(",")]
        except ValueError:
            raise DiffAugError(f"--class-intensity {text!r}: {value!r} is not a number (or one per channel, "
                               f"comma separated).") from None
        if len(means) == 1:
            means = means * num_channels
        if len(means) != num_channels or not all(np.isfinite(means)):
            raise DiffAugError(f"--class-intensity {text!r}: give one finite mean, or one per channel "
                               f"({num_channels}).")
        out[label_values.index(value_of)] = means
    return out


class ClassIntensityPlan:
    """The statistics each synthetic case is painted with, from the fold's training cases.

    - a case with a source (``--labels real`` / ``real-aligned``): the source case's statistics;
    - a generated label map: those of one training case drawn at random (all classes jointly, so the
      case stays consistent); classes absent from that case take the fold's median statistics;
    - ``jitter`` S > 0: every class's mean moves by S x N(0, 1) x the fold's between-case sd of it;
    - ``requests`` {class index: normalised means}: paint that class at that mean (after jitter).
    """

    def __init__(self, case_stats: dict[str, np.ndarray], class_names: list[str], jitter: float = 0.0,
                 requests: dict[int, list[float]] | None = None):
        self.case_stats = case_stats
        stacked = np.stack(list(case_stats.values()))
        self.spread = between_case_sd(stacked)
        with _quiet_nan_warnings():
            self.fallback = np.nanmedian(stacked, axis=0)   # NaN only for a class absent from every case
        self.class_names, self.jitter, self.requests = class_names, float(jitter), dict(requests or {})

    def for_case(self, stats_case: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        """(K, C, 2) statistics for one synthetic case, and its record."""
        stats = self.case_stats[stats_case].copy()
        absent = ~np.isfinite(stats)
        stats[absent] = self.fallback[absent]
        if self.jitter > 0:
            stats[..., 0] += self.jitter * rng.standard_normal(self.spread.shape) * self.spread
        for k, means in self.requests.items():
            stats[k, :, 0] = means
            if not np.isfinite(stats[k, :, 1]).all():
                stats[k, :, 1] = 0.0
        record = {"stats_case": stats_case, "jitter": self.jitter,
                  "classes": {name: {"mean": [round(float(v), 5) for v in stats[k, :, 0]],
                                     "sd": [round(float(v), 5) for v in stats[k, :, 1]]}
                              for k, name in enumerate(self.class_names) if np.isfinite(stats[k]).all()}}
        if self.requests:
            record["requested_mean"] = {self.class_names[k]: [round(float(v), 5) for v in m]
                                        for k, m in self.requests.items()}
        return stats, record
