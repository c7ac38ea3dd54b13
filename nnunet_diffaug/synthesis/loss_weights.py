"""Class-balanced weights for the synthesizer's losses, so small structures get reconstructed and painted.

Plain L1 / MSE is dominated by the large classes: ribs, vessels or a tumour fill few voxels, and a
small model learns to reproduce soft tissue there (measured on the example CT: the tiny
autoencoder halves the ribs' contrast, and the diffusion model paints ribs at soft-tissue
intensity). MAISI weights tumour voxels x100 in its diffusion loss for the same reason. Here every
foreground class gets a weight from its share of the training voxels,

    w_c = min(cap, f_largest / f_c)        (f_largest: the share of the largest foreground class),

background and nnU-Net's "outside" keep weight 1. On the latent grid a voxel takes the largest
weight of the classes inside its footprint (max pooling, so a one-voxel-thin rib still counts).
cap = 1 turns the weighting off.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def class_voxel_fractions(label_volumes, num_classes: int) -> np.ndarray:
    """Share of all voxels of the given class-index volumes that each class index holds."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for volume in label_volumes:
        counts += np.bincount(np.asarray(volume).ravel(), minlength=num_classes)[:num_classes]
    return counts / max(counts.sum(), 1.0)


def class_weights(fractions: np.ndarray, foreground: list[int], cap: float) -> np.ndarray:
    """Per class-index loss weight: ``min(cap, f_largest / f_c)`` for the foreground classes, 1 elsewhere.
    A foreground class absent from the training data gets the cap (it can only appear in requests)."""
    weights = np.ones(len(fractions), dtype=np.float64)
    if cap <= 1.0 or not foreground:
        return weights
    largest = max(fractions[c] for c in foreground)
    for c in foreground:
        weights[c] = cap if fractions[c] <= 0 else float(np.clip(largest / fractions[c], 1.0, cap))
    return weights


def voxel_weight_map(labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, 1, *spatial) class indices -> (B, 1, *spatial) weights."""
    return weights.to(labels.device)[labels.long()].float()


def latent_weight_map(labels: torch.Tensor, weights: torch.Tensor, latent_shape) -> torch.Tensor:
    """(B, 1, *full) class indices -> (B, 1, *latent) weights: the largest class weight in each latent
    voxel's footprint."""
    pool = F.adaptive_max_pool3d if labels.dim() == 5 else F.adaptive_max_pool2d
    return pool(voxel_weight_map(labels, weights), tuple(latent_shape))


def weighted_mean(errors: torch.Tensor, weight_map: torch.Tensor) -> torch.Tensor:
    """Mean of per-voxel errors (B, C, *spatial) with (B, 1, *spatial) weights, normalised by the weights
    so the loss (and the learning rate that suits it) keeps the scale of the plain mean."""
    weight = weight_map.expand_as(errors)
    return (weight * errors).sum() / weight.sum()
