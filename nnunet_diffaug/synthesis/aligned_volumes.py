"""Whole volumes on a training case's own grid (``diffaug_synthesize --labels real-aligned``, what PatchMix pairs).

Case ``i`` is training case ``i mod n`` (sorted ids), its preprocessed label map unchanged, so the synthetic
variant lies on the same voxel grid as the real case. 2D synthesizers paint every slice (in batches) and stack
them into a full volume.
"""
from __future__ import annotations

import numpy as np
import torch

from nnunet_diffaug.synthesis.data import FoldData
from nnunet_diffaug.synthesis.rawspace import RawSpace

ALIGNED_SLICE_BATCH = 8  # 2D slices painted per call: bounded memory on long volumes


def aligned_source(data: FoldData, index: int) -> tuple[str, np.ndarray]:
    """Training case ``index mod n`` (sorted ids) and its unchanged class-index label volume."""
    case_id = data.training_cases[index % len(data.training_cases)]
    return case_id, data.label_volume(case_id)


def paint_volume(syn, volume_labels: np.ndarray, sampler, generator: torch.Generator,
                 edge_images: np.ndarray | None = None, spacing=None, class_stats=None) -> np.ndarray:
    """(*spatial 3D) class indices -> (C, *spatial) normalised image; 2D synthesizers paint slice batches.

    ``edge_images``: (1, C, *spatial) real image of the volume for the edge hint; ``spacing``: its tag;
    ``class_stats``: the volume's per-class intensity statistics (the same for every slice).
    """
    if syn.spec.spatial_dims == 3:
        return syn.generate(volume_labels[None], sampler, generator, edge_images=edge_images, spacing=spacing,
                            class_stats=class_stats)[0]
    parts = []
    for z in range(0, volume_labels.shape[0], ALIGNED_SLICE_BATCH):
        slices = None if edge_images is None else edge_images[0][:, z:z + ALIGNED_SLICE_BATCH].transpose(1, 0, 2, 3)
        parts.append(syn.generate(volume_labels[z:z + ALIGNED_SLICE_BATCH], sampler, generator,
                                  edge_images=slices, spacing=spacing, class_stats=class_stats))
    return np.concatenate(parts, axis=0).transpose(1, 0, 2, 3)  # (Z, C, H, W) -> (C, Z, H, W)


def aligned_raw_space(data: FoldData, case_id: str) -> RawSpace:
    """A 3D RawSpace on the case's preprocessed grid. 2D plans keep each case's own spacing along the first
    (transposed) axis, so that axis takes the case's spacing: nnU-Net then preprocesses it to the same shape."""
    space = RawSpace(data.plans_manager, data.cm, 3, data.label_values, data.num_classes - data.outside_class - 1)
    if data.spatial_dims == 3:
        return space
    props = data.case(case_id)[2]
    first_axis = float(props["spacing"][data.plans_manager.transpose_forward[0]])
    space.spacing = [first_axis] + [float(s) for s in data.cm.spacing[-2:]]
    return space
