"""A label-fidelity reader for the tests, fitted in milliseconds and needing no downloaded weights (users score
synthetic sets with ``diffaug_evaluate``, which reads them with an nnU-Net trained on real cases).

Label fidelity: a per-voxel classifier fitted on REAL image/label pairs (intensity and local mean
intensity, one Gaussian per class) reads the labels back from synthetic images; its Dice against
the label maps that conditioned them says how well the images follow their labels. Classes that
intensity alone cannot tell apart (left vs right lung) are scored as groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def voxel_features(image: np.ndarray) -> np.ndarray:
    """(*spatial) image of one channel -> (voxels, 2): intensity and its 3-voxel box mean."""
    from scipy.ndimage import uniform_filter
    img = np.asarray(image, dtype=np.float64)
    return np.stack([img.ravel(), uniform_filter(img, size=3, mode="nearest").ravel()], axis=1)


@dataclass
class VoxelClassifier:
    """Gaussian class-conditional model with diagonal covariance and equal class priors."""
    means: np.ndarray      # (classes, features)
    variances: np.ndarray  # (classes, features)
    classes: np.ndarray

    @classmethod
    def fit(cls, images: list[np.ndarray], labels: list[np.ndarray]) -> "VoxelClassifier":
        feats = np.concatenate([voxel_features(i) for i in images])
        labs = np.concatenate([np.asarray(lab).ravel() for lab in labels])
        classes = np.unique(labs)
        means = np.stack([feats[labs == c].mean(0) for c in classes])
        variances = np.stack([feats[labs == c].var(0) + 1e-4 for c in classes])
        return cls(means, variances, classes)

    def predict(self, image: np.ndarray) -> np.ndarray:
        f = voxel_features(image)[:, None, :]
        loglik = -0.5 * (((f - self.means[None]) ** 2) / self.variances[None] + np.log(self.variances[None])).sum(-1)
        return self.classes[np.argmax(loglik, axis=1)].reshape(np.shape(image))


def grouped_dice(pred: np.ndarray, target: np.ndarray, groups: list[list[int]]) -> float:
    """Mean Dice over groups of classes present in ``target`` (a group counts as one label)."""
    scores = []
    for g in groups:
        t, p = np.isin(target, g), np.isin(pred, g)
        if t.sum() == 0:
            continue
        scores.append(2.0 * np.logical_and(t, p).sum() / (t.sum() + p.sum()))
    return float(np.mean(scores)) if scores else float("nan")


def label_fidelity(classifier: VoxelClassifier, images: list[np.ndarray], labels: list[np.ndarray],
                   groups: list[list[int]]) -> float:
    """Grouped Dice of the real-fitted classifier's reading of ``images`` against ``labels`` (pooled voxels)."""
    pred = np.concatenate([classifier.predict(i).ravel() for i in images])
    target = np.concatenate([np.asarray(lab).ravel() for lab in labels])
    return grouped_dice(pred, target, groups)
