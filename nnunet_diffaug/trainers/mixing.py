"""Mixing synthetic cases into nnU-Net training batches at a given ratio.

nnU-Net's data loader draws ``batch_size`` case keys uniformly from one dataset and forces foreground
in the LAST third of the batch (positional oversampling). We keep its loader and change only which
keys it draws: ``round(r * batch_size)`` synthetic keys (stochastic rounding), the rest real, in a
shuffled order so oversampling hits both kinds.

The ratio lives in shared memory: nnU-Net's training loader runs in forked worker processes, so a
plain attribute set in the trainer (a schedule changing r per epoch) would never reach them.
"""
from __future__ import annotations

import math
import multiprocessing

import numpy as np

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset

# Synthetic keys get a prefix no nnU-Net case identifier can have ('/' is refused in raw case ids),
# so real and synthetic cases never collide and a batch's keys tell which kind each sample is.
SYNTHETIC_KEY_PREFIX = "diffaug-synthetic/"


def is_synthetic_key(key: str) -> bool:
    return str(key).startswith(SYNTHETIC_KEY_PREFIX)


def synthetic_count(ratio: float, batch_size: int, rng=np.random) -> int:
    """How many of ``batch_size`` samples are synthetic: ratio * batch_size with stochastic rounding,
    so that the expected share is exactly ``ratio`` even when ratio * batch_size is fractional."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"synthetic ratio must lie in [0, 1], got {ratio}")
    expected = ratio * batch_size
    low = math.floor(expected)
    return int(low + (rng.uniform() < expected - low))


class MixedDataset:
    """Real and synthetic nnU-Net datasets behind one ``load_case``; synthetic keys carry a prefix."""

    def __init__(self, real: nnUNetBaseDataset, synthetic: nnUNetBaseDataset):
        self.real = real
        self.synthetic = synthetic
        self.real_identifiers = list(real.identifiers)
        self.synthetic_identifiers = [SYNTHETIC_KEY_PREFIX + i for i in synthetic.identifiers]
        self.identifiers = self.real_identifiers + self.synthetic_identifiers

    def __getitem__(self, identifier):
        return self.load_case(identifier)

    def load_case(self, identifier: str):
        if is_synthetic_key(identifier):
            return self.synthetic.load_case(identifier[len(SYNTHETIC_KEY_PREFIX):])
        return self.real.load_case(identifier)


class RatioDataLoader(nnUNetDataLoader):
    """nnU-Net's training data loader, drawing a synthetic share per batch that may change during training."""

    def __init__(self, data: MixedDataset, *args, synthetic_ratio: float, **kwargs):
        super().__init__(data, *args, **kwargs)
        if not data.real_identifiers:
            raise ValueError("RatioDataLoader needs at least one real training case")
        self.real_keys = np.array(data.real_identifiers)
        self.synthetic_keys = np.array(data.synthetic_identifiers)
        # created here, before any augmenter forks its workers, so they all share this one value
        self._shared_ratio = multiprocessing.Value("d", 0.0)
        self.synthetic_ratio = synthetic_ratio

    @property
    def synthetic_ratio(self) -> float:
        return self._shared_ratio.value

    @synthetic_ratio.setter
    def synthetic_ratio(self, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"synthetic ratio must lie in [0, 1], got {ratio}")
        if ratio > 0 and not len(self.synthetic_keys):
            raise ValueError("RatioDataLoader got a positive synthetic ratio but no synthetic cases")
        self._shared_ratio.value = float(ratio)

    def get_indices(self):
        n_synthetic = synthetic_count(self.synthetic_ratio, self.batch_size)
        keys = np.concatenate([
            np.random.choice(self.real_keys, self.batch_size - n_synthetic, replace=True),
            np.random.choice(self.synthetic_keys, n_synthetic, replace=True) if n_synthetic else np.array([], dtype=str),
        ])
        np.random.shuffle(keys)
        return [str(k) for k in keys]
