"""Context classes: what the image shows where the labels say "background" (``"context"`` in the config).

Why: most real datasets label one to three structures; everything else is background. A label-conditioned
model then has nothing telling it where the body, the air or the other tissues are, and paints the
background from its prior alone (a field of noise around the labelled structure). nnU-Net learns from every
background voxel, so wrong context teaches it wrong negatives. Both anchors of this idea derive extra
classes from the image itself:

- a **body envelope** (MAISI, Guo et al., "MAISI: Medical AI for Synthetic Imaging", WACV 2025: everything
  inside the body that carries no organ label): CT voxels above ``body_threshold_hu``, other modalities above
  an Otsu threshold fitted on the fold's training cases; the largest connected part (the table and loose
  voxels go), holes filled slice by slice (lungs and bowel gas are inside the body);
- **intensity clusters** (SynthSeg's generation classes, Billot et al., "SynthSeg: Segmentation of brain MRI
  scans of any contrast and resolution without retraining", Medical Image Analysis 2023): k-means over the
  normalised intensities of the unlabelled voxels (inside the body when ``body`` is on), fitted on the
  fold's training cases only, so cluster ``k`` is the same tissue in every case.

Context classes are appended after nnU-Net's "outside" class: class indices ``0..L-1`` are the declared
labels, ``L`` is "outside", ``L+1..L+K`` the context classes. They replace background voxels only; the label
map written to a synthetic dataset maps them back to background (the segmenter never sees them).

Everything is computed in nnU-Net's preprocessed space (normalised intensities) and cached per case beside the
preprocessed data (``nnUNet_preprocessed/<dataset>/diffaug_context/<data identifier>/<model key>/``), so the
synthesizer's training and ``diffaug_synthesize`` read the same maps; a changed model is another folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import atomic_path, atomic_write_json

FIT_VOXELS_PER_CASE = 50_000   # intensity samples per training case for the threshold and the clusters
SMOOTHING_SIGMA = 1.0          # voxels, in-plane: clusters of a slightly smoothed image are regions, not speckle
CACHE_FOLDER = "diffaug_context"
CLIP_MARGIN = 0.01             # "above the clipping floor": by 1% of the clipped range, in normalised units


def std_range(intensity_properties: dict) -> float:
    """The width of nnU-Net's CT clipping range in normalised units."""
    p = intensity_properties
    return (float(p["percentile_99_5"]) - float(p["percentile_00_5"])) / max(float(p["std"]), 1e-8)


@dataclass
class ContextModel:
    """Context fitted on a fold's training cases: stored in the synthesizer's DataSpec (``context``)."""
    body: bool
    body_threshold: float | None        # channel 0, normalised units; None when body is off
    body_method: str                     # "ct_hu" or "otsu" (or "" when body is off)
    centres: list[list[float]]           # (K, channels) k-means centres in normalised units, sorted by channel 0

    @property
    def num_classes(self) -> int:
        return len(self.centres) if self.centres else int(self.body)

    def class_names(self) -> list[str]:
        if self.centres:
            return [f"context_{'body_' if self.body else ''}cluster_{k + 1}" for k in range(len(self.centres))]
        return ["context_body"]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict | None, where: str) -> "ContextModel | None":
        if obj is None:
            return None
        try:
            return cls(**obj)
        except TypeError as e:
            raise DiffAugError(f"{where}: its 'context' entry is not one this version can read ({e}).") from None

    def key(self) -> str:
        """Content key of the fitted model: the cache folder of its maps."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ one case
    def case_context(self, image: np.ndarray, labels: np.ndarray, outside_class: int) -> np.ndarray:
        """(C, *spatial) normalised image + (*spatial) class indices -> (*spatial) uint8: 0 where no context
        applies (labelled voxels, "outside", air outside the body), else the context class 1..K."""
        free = labels == 0
        if self.body:
            free &= body_mask(image[0], self.body_threshold, (labels > 0) & (labels != outside_class))
        out = np.zeros(labels.shape, dtype=np.uint8)
        if not self.centres:
            out[free] = 1
            return out
        values = smoothed(image, free)[:, free].T               # (voxels, C)
        out[free] = nearest_centre(values, np.asarray(self.centres, dtype=np.float32)) + 1
        return out


def merge(labels: np.ndarray, context: np.ndarray, outside_class: int) -> np.ndarray:
    """Class-index labels with their background voxels replaced by the context classes (index ``L + k``)."""
    out = np.array(labels, dtype=np.uint8, copy=True)
    where = (context > 0) & (out == 0)
    out[where] = outside_class + context[where]
    return out


def smoothed(image: np.ndarray, within: np.ndarray | None = None) -> np.ndarray:
    """Gaussian-smoothed in the last two (in-plane) axes (nnU-Net's first axis is often much coarser). ``within``:
    a mask; only its voxels are averaged (normalised convolution), so the air around the body and the labelled
    structures do not bleed into the clusters' border voxels."""
    from scipy.ndimage import gaussian_filter
    sigma = [0.0] * (image.ndim - 3) + [SMOOTHING_SIGMA] * 2  # (C, *spatial): per channel
    if within is None:
        return np.stack([gaussian_filter(np.asarray(c, dtype=np.float32), sigma) for c in image])
    weight = gaussian_filter(within.astype(np.float32), sigma)
    return np.stack([gaussian_filter(np.where(within, np.asarray(c, dtype=np.float32), 0.0), sigma)
                     / np.maximum(weight, 1e-6) for c in image])


def nearest_centre(values: np.ndarray, centres: np.ndarray, chunk: int = 2**22) -> np.ndarray:
    """(voxels, C) values -> (voxels,) index of the nearest centre; in chunks, so a whole CT (tens of millions of
    voxels) never holds a (voxels, K, C) distance array at once."""
    out = np.empty(len(values), dtype=np.uint8)
    for start in range(0, len(values), chunk):
        part = values[start:start + chunk]
        out[start:start + chunk] = ((part[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    return out


def body_mask(channel: np.ndarray, threshold: float, labelled: np.ndarray) -> np.ndarray:
    """Voxels above ``threshold``, opened in-plane (cuts thin bridges to the table), largest connected part,
    holes filled slice by slice, united with every labelled voxel (a label lies inside the body)."""
    from scipy import ndimage
    mask = np.asarray(channel) > threshold
    in_plane = np.zeros((1,) * (mask.ndim - 2) + (3, 3), dtype=bool)
    in_plane[..., 1, :] = in_plane[..., :, 1] = True
    mask = ndimage.binary_opening(mask, structure=in_plane)
    parts, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0
        mask = parts == sizes.argmax()
    mask |= labelled
    flat = mask.reshape(-1, *mask.shape[-2:])
    for i in range(len(flat)):
        flat[i] = ndimage.binary_fill_holes(flat[i])
    return flat.reshape(mask.shape)


# ---------------------------------------------------------------------------------------------- fitting

def fit_context(body: bool, clusters: int, body_threshold_hu: float, cases, scheme: str,
                intensity_properties: dict | None, outside_class: int, seed: int) -> ContextModel:
    """Fits the context on the fold's training cases. ``cases()`` yields their (image (C, *spatial), class
    indices) pairs one at a time (a pass per fitted quantity keeps one case in memory at once).

    ``scheme``/``intensity_properties``: nnU-Net's normalisation of channel 0 and its foreground statistics
    (CT: the HU threshold is converted to normalised units with them)."""
    rng = np.random.default_rng([seed, 38])
    threshold, method = None, ""
    if body and scheme == "CTNormalization":
        std = max(float(intensity_properties["std"]), 1e-8)
        threshold, method = (body_threshold_hu - float(intensity_properties["mean"])) / std, "ct_hu"
        floor = (float(intensity_properties["percentile_00_5"]) - float(intensity_properties["mean"])) / std
        if threshold <= floor:
            # nnU-Net clips CT to the LABELLED voxels' [0.5, 99.5] percentiles: with only bones labelled the floor
            # sits near +15 HU, and air, lungs and fat are all clipped to it. The body is then what lies above the
            # floor (skin, muscle, organs, bone) with its holes filled.
            threshold, method = floor + CLIP_MARGIN * std_range(intensity_properties), "ct_above_clip_floor"
    elif body:
        from skimage.filters import threshold_otsu
        values = np.concatenate([_subsample(np.asarray(img[0]).ravel(), rng) for img, _ in cases()])
        threshold, method = float(threshold_otsu(values)), "otsu"
    model = ContextModel(body, None if threshold is None else float(threshold), method, [])
    if clusters <= 0:
        return model
    samples = []
    for image, labels in cases():
        free = labels == 0
        if body:
            free &= body_mask(image[0], threshold, (labels > 0) & (labels != outside_class))
        values = smoothed(image, free)[:, free].T
        samples.append(values[_subsample_index(len(values), rng)])
    values = np.concatenate(samples)
    if len(values) < clusters:
        raise DiffAugError(f"context: {clusters} intensity clusters asked for, but the fold's training cases have "
                           f"only {len(values)} unlabelled{' body' if body else ''} voxels; lower context.clusters.")
    from sklearn.cluster import KMeans
    km = KMeans(n_clusters=clusters, n_init=4, random_state=int(rng.integers(2**31 - 1))).fit(values)
    centres = km.cluster_centers_[np.argsort(km.cluster_centers_[:, 0])]
    model.centres = [[round(float(v), 6) for v in c] for c in centres]
    return model


def _subsample_index(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= FIT_VOXELS_PER_CASE else np.sort(rng.choice(n, FIT_VOXELS_PER_CASE, replace=False))


def _subsample(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return values[_subsample_index(len(values), rng)]


# ---------------------------------------------------------------------------------------------- cache

class ContextCache:
    """The context maps of one fitted model, one ``<case>.npy`` (uint8) per case, written atomically on first
    use and memory-mapped after, so training crops read only what they need."""

    def __init__(self, folder: Path, model: ContextModel, outside_class: int):
        self.folder, self.model, self.outside_class = Path(folder) / model.key(), model, outside_class
        self._open: dict[str, np.ndarray] = {}

    def volume(self, case_id: str, image_and_labels) -> np.ndarray:
        """The case's context map; ``image_and_labels()`` gives (image, labels) when it must be computed."""
        if case_id in self._open:
            return self._open[case_id]
        path = self.folder / f"{case_id}.npy"
        if not path.is_file():
            image, labels = image_and_labels()
            context = self.model.case_context(image, labels, self.outside_class)
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / "context_model.json").is_file():
                atomic_write_json(self.folder / "context_model.json", self.model.to_json())
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, context)
        self._open[case_id] = np.load(path, mmap_mode="r")
        return self._open[case_id]
