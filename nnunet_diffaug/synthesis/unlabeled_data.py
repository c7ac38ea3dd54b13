"""Training crops from unlabelled images (``--unlabeled``), and batches that mix them with the fold's labelled
crops: the autoencoder sees every image alike, the image diffusion model a configured share of unlabelled
samples per batch, trained on the "no label" condition (classifier-free, after Ho & Salimans,
"Classifier-Free Diffusion Guidance", arXiv 2207.12598, 2022).

Without unlabelled images the mixed sampler draws exactly what the labelled sampler alone would (same random
stream), so synthesizers trained without them train as before.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

import numpy as np
import torch

from nnunet_diffaug.synthesis.data import PatchSampler, pad_to

UNLABELED_PREFIX = "unlabeled:"  # the case id of an unlabelled sample in a batch
OPEN_ARRAYS = 64  # memory-mapped pool images kept open: a pool of thousands must not exhaust file handles


class UnlabeledPatchSampler:
    """Uniformly placed crops (3D) or crops of slices (2D) of preprocessed unlabelled images, read lazily."""

    def __init__(self, images: list, patch_size: list[int], spatial_dims: int):
        self.images = list(images)
        self.patch_size, self.spatial_dims = list(patch_size), spatial_dims
        self._arrays: OrderedDict[int, np.ndarray] = OrderedDict()  # least recently used first
        units = np.array([im.shape[1] if spatial_dims == 2 else 1 for im in self.images], dtype=float)
        self.units = float(units.sum())          # slices (2D) or volumes (3D): the autoencoder's share
        self.p = units / units.sum()

    def _array(self, i: int) -> np.ndarray:
        if i in self._arrays:
            self._arrays.move_to_end(i)
            return self._arrays[i]
        if len(self._arrays) >= OPEN_ARRAYS:
            self._arrays.popitem(last=False)  # its memory map (and file handle) goes with its last reference
        self._arrays[i] = self.images[i].load()
        return self._arrays[i]

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        i = int(rng.choice(len(self.images), p=self.p))
        data = self._array(i)
        shape = list(data.shape[1:])
        lead: tuple = (slice(None),)
        if self.spatial_dims == 2:
            lead = (slice(None), int(rng.integers(shape[0])))
            shape = shape[1:]
        slices = []
        for s, p in zip(shape, self.patch_size):
            start = int(rng.integers(max(s - p, 0) + 1))
            slices.append(slice(start, start + min(p, s)))
        img = np.asarray(data[(*lead, *slices)], dtype=np.float32)
        return pad_to(img, self.patch_size)[0], i


@dataclasses.dataclass
class MixedBatch:
    images: torch.Tensor                  # (B, C, *patch)
    labels: torch.Tensor                  # (B, 1, *patch) class indices; 0 where the sample has no label map
    case_ids: list[str]                   # labelled case ids; UNLABELED_PREFIX + content hash otherwise
    unlabeled: torch.Tensor               # (B,) booleans
    spacings: list[list[float]]           # acquisition spacing of each sample's source image


class MixedSampler:
    """Labelled crops of the fold plus, with probability ``share`` per sample slot, unlabelled crops.

    The number of unlabelled samples in a batch is ``share * B`` rounded at random (so the expected share is
    exact for any batch size); which slots they take is random too.
    """

    def __init__(self, labelled: PatchSampler | None, unlabeled: UnlabeledPatchSampler | None, share: float):
        """``labelled`` None: unlabelled images only (``--unlabeled-only``), every sample on the null condition."""
        self.labelled, self.unlabeled = labelled, unlabeled
        self.share = share if unlabeled is not None else 0.0
        if labelled is None:
            self.share = 1.0
        self.data = None if labelled is None else labelled.data
        self.cases = [] if labelled is None else labelled.cases

    def mixed_batch(self, rng: np.random.Generator, batch_size: int) -> MixedBatch:
        if self.share <= 0:
            images, labels, ids = self.labelled.batch_with_cases(rng, batch_size)
            return MixedBatch(images, labels, ids, torch.zeros(batch_size, dtype=torch.bool),
                              [self.data.acquisition_spacing(c) for c in ids])
        n_unl = int(np.floor(self.share * batch_size))
        n_unl += int(rng.random() < self.share * batch_size - n_unl)
        slots = np.zeros(batch_size, dtype=bool)
        slots[rng.permutation(batch_size)[:n_unl]] = True
        images, labels, ids, spacings = [], [], [], []
        label_shape = (1, *self.unlabeled.patch_size)
        for is_unl in slots:
            if is_unl:
                img, i = self.unlabeled.sample(rng)
                images.append(img)
                labels.append(np.zeros(label_shape, dtype=np.uint8))
                ids.append(UNLABELED_PREFIX + self.unlabeled.images[i].content_sha256)
                spacings.append(list(self.unlabeled.images[i].spacing))
            else:
                img, lab, cid = self.labelled.sample(rng)
                images.append(img)
                labels.append(lab)
                ids.append(cid)
                spacings.append(self.data.acquisition_spacing(cid))
        return MixedBatch(torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels).astype(np.int64)),
                          ids, torch.from_numpy(slots), spacings)

    def batch(self, rng: np.random.Generator, batch_size: int):
        """(images, labels), as :meth:`PatchSampler.batch` (the latent scale factor's estimate uses it)."""
        b = self.mixed_batch(rng, batch_size)
        return b.images, b.labels


def autoencoder_share(labelled: PatchSampler, unlabeled: UnlabeledPatchSampler | None) -> float:
    """The autoencoder learns every image alike: the unlabelled share of all volumes (3D) or slices (2D)."""
    if unlabeled is None:
        return 0.0
    if labelled is None:
        return 1.0
    units = float(np.sum([labelled.shapes[c][0] if labelled.data.spatial_dims == 2 else 1 for c in labelled.cases]))
    return unlabeled.units / (unlabeled.units + units)
