"""Realism: Fréchet distance between sets of encoder features (the idea of FID, on the user's own nnU-Net).

FID needs an ImageNet Inception network whose weights must be downloaded; here the features come
from the trained nnU-Net's encoder instead (see ``TrainedModel.encoder_features``): one vector per
patch-sized tile: the last convolution of each encoder stage (before instance norm, which would
remove the per-case statistics), global-average-pooled, stages concatenated.

Small-sample care: with few cases there are fewer tiles than feature dimensions, so the covariances
are singular. Both are regularised with ``eps * I`` (on standardised features, where 1 is one
standard deviation of the real data), which keeps the matrix square root real and stable; the
reported numbers are therefore comparable with each other, not with published FIDs.
"""
from __future__ import annotations

import numpy as np
from scipy import linalg

DEFAULT_EPS = 1e-3


def standardiser(reference: np.ndarray, floor: float = 1e-6):
    """Per-feature z-scoring with the reference's mean and standard deviation.

    Why: encoder stages differ in scale by orders of magnitude; without this the deepest stage
    alone would decide the distance. One transform is applied to every set compared.
    """
    mean, std = reference.mean(0), reference.std(0)
    std = np.where(std > floor, std, 1.0)  # constant (dead) channels carry no information: leave them at 0
    return lambda x: (x - mean) / std


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = DEFAULT_EPS) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) with S = cov + eps*I. Rows are samples."""
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least two feature vectors per set")
    eye = np.eye(a.shape[1])
    s_a = np.cov(a, rowvar=False) + eps * eye
    s_b = np.cov(b, rowvar=False) + eps * eye
    covmean = linalg.sqrtm(s_a @ s_b)
    covmean = np.real(covmean)  # imaginary parts are numerical noise for these positive-definite inputs
    d = float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a + s_b - 2.0 * covmean))
    return max(d, 0.0)


def frechet_table(f: dict[str, np.ndarray], eps: float = DEFAULT_EPS) -> dict:
    """The three distances of the realism block between already standardised feature sets
    {'synthetic', 'training', 'validation'} -> (tiles, dims)."""
    def fd(a, b):  # a set of one tile has no covariance: report it as missing rather than fail the run
        return frechet_distance(f[a], f[b], eps) if min(len(f[a]), len(f[b])) >= 2 else float("nan")
    return {"frechet_synthetic_vs_validation": fd("synthetic", "validation"),
            "frechet_training_vs_validation": fd("training", "validation"),
            "frechet_synthetic_vs_training": fd("synthetic", "training")}


def realism_report(features: dict[str, np.ndarray], eps: float = DEFAULT_EPS) -> dict:
    """``features``: {'synthetic', 'training', 'validation'} -> (tiles, dims).

    The held-out validation cases are the target; how far the fold's training cases are from them
    (another real sample of the same anatomy) is the reference a good synthetic set should approach.
    """
    z = standardiser(np.concatenate([features["training"], features["validation"]]))
    f = {k: z(v) for k, v in features.items()}
    return {
        **frechet_table(f, eps),
        "feature_dims": int(f["synthetic"].shape[1]),
        "tiles": {k: int(len(v)) for k, v in f.items()},
        "covariance_regularisation_eps": eps,
    }
