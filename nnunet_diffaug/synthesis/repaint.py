"""A real case repainted inside a region by the trained synthesizer (``--labels inpaint``).

The real image is encoded by the synthesizer's autoencoder; latent RePaint
(:func:`~nnunet_diffaug.synthesis.sampling.sample_latents_inpaint`) samples only the latents that touch
the region, conditioned on the edited label map; the decoded image is blended into the real one with a
feathered weight that is exactly 0 outside the region, so every voxel there keeps the real value.

Only what touches the region is sampled: 3D, the region's bounding box grown to at least the training
patch (context for the model); 2D synthesizers, the slices that hold region voxels, in batches.
Edge hints use the (edited) label boundaries only: the real image's edges would still show the old structure.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_diffaug.synthesis.autoencoder import encode_mean
from nnunet_diffaug.synthesis.data import pad_to
from nnunet_diffaug.synthesis.inpainting import feather
from nnunet_diffaug.synthesis.aligned_volumes import ALIGNED_SLICE_BATCH
from nnunet_diffaug.synthesis.sampling import (Sampler, autocast, decode_latents, enable_fast_cpu_convolutions,
                                               padded_shape, sample_latents_inpaint)


@torch.no_grad()
def _encode(syn, images: torch.Tensor) -> torch.Tensor:
    """Scaled latent means of (B, C, *spatial) images; larger than the training patch by sliding windows."""
    patch = list(syn.spec.patch_size)
    spatial = list(images.shape[2:])
    if all(s <= p for s, p in zip(spatial, patch)):
        return encode_mean(syn.autoencoder, images) * syn.scale_factor
    from monai.inferers import sliding_window_inference
    z = sliding_window_inference(images, roi_size=[min(s, p) for s, p in zip(spatial, patch)], sw_batch_size=1,
                                 predictor=lambda x: encode_mean(syn.autoencoder, x),
                                 overlap=syn.config.sampling.decode_overlap, mode="gaussian")
    return z * syn.scale_factor


@torch.no_grad()
def repaint_batch(syn, labels: np.ndarray, images: np.ndarray, repaint: np.ndarray, sampler: Sampler,
                  generator: torch.Generator, resample_jumps: int, spacing=None, class_stats=None) -> np.ndarray:
    """(B, *spatial) edited labels, (B, C, *spatial) real images, (B, *spatial) region -> painted images
    (B, C, *spatial), clamped to the training range; not yet blended (see :func:`repaint_volume`)."""
    if syn.device.type == "cpu":
        enable_fast_cpu_convolutions(syn.model)
        enable_fast_cpu_convolutions(syn.autoencoder)
    spatial = labels.shape[1:]
    target = padded_shape(spatial, syn.config.divisor())
    dev = syn.device

    def tensor(a, dtype):
        return torch.from_numpy(np.ascontiguousarray(pad_to(a, target)[0]).astype(dtype)).to(dev)
    lab_t = tensor(labels[:, None], np.int64)
    img_t = tensor(images, np.float32)
    region_t = tensor(repaint[:, None], np.float32)
    spacing_t = None
    if spacing is not None:
        spacing_t = torch.from_numpy(np.broadcast_to(np.asarray(spacing, np.float32), (len(labels), 3)).copy()).to(dev)
    stats_t = None
    if class_stats is not None:  # class-intensity conditioning: one (K, C, 2) for the whole batch
        stats = np.asarray(class_stats, np.float32)
        stats_t = torch.from_numpy(np.broadcast_to(stats, (len(labels), *stats.shape[-3:])).copy()).to(dev)
    condition = syn.condition(lab_t, None, spacing_t, stats_t)
    f = syn.config.latent_factor()
    pool = F.max_pool3d if len(spatial) == 3 else F.max_pool2d
    latent_region = pool(region_t, kernel_size=f, stride=f)  # a latent voxel is repainted if any of its voxels is
    with autocast(dev, syn.config.mixed_precision):
        known = _encode(syn, img_t).float()
        window = syn.latent_window if syn.config.sampling.diffusion_windows else None
        z = sample_latents_inpaint(syn.sampling_model(), condition, known, latent_region, sampler, generator, resample_jumps,
                                   window=window, overlap=syn.config.sampling.diffusion_overlap)
        out = decode_latents(syn.autoencoder, z / syn.scale_factor, syn.latent_window, syn.config.sampling.decode_overlap)
    pads = pad_to(labels[:, None], target)[1]
    crop = tuple(slice(b, b + s) for (b, _), s in zip(pads, spatial))
    out = out[(slice(None), slice(None), *crop)].float().cpu().numpy()
    lo = np.asarray(syn.spec.intensity_min, np.float32).reshape(1, -1, *[1] * len(spatial))
    hi = np.asarray(syn.spec.intensity_max, np.float32).reshape(1, -1, *[1] * len(spatial))
    return np.clip(np.nan_to_num(out, nan=0.0), lo, hi)


def _context_box(repaint: np.ndarray, min_size: list[int]) -> tuple[slice, ...]:
    """The region's bounding box grown (centred, inside the volume) to at least ``min_size``."""
    box = []
    for axis, (size, want) in enumerate(zip(repaint.shape, min_size)):
        idx = np.flatnonzero(repaint.any(axis=tuple(a for a in range(repaint.ndim) if a != axis)))
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        grow = max(0, min(want, size) - (hi - lo))
        lo = max(0, min(lo - grow // 2, size - max(hi - lo, min(want, size))))
        box.append(slice(lo, min(size, max(hi, lo + min(want, size)))))
    return tuple(box)


def repaint_volume(syn, labels: np.ndarray, source_image: np.ndarray, repaint: np.ndarray, margin: int,
                   sampler: Sampler, generator: torch.Generator, resample_jumps: int,
                   spacing=None, class_stats=None) -> tuple[np.ndarray, dict]:
    """(*spatial 3D) edited labels, (C, *spatial) real normalised image, boolean region -> (image, record).

    Outside ``repaint`` the returned image IS ``source_image`` (bit for bit); inside it the painted image
    is blended in with :func:`~nnunet_diffaug.synthesis.inpainting.feather`.
    """
    source_image = np.asarray(source_image, dtype=np.float32)
    painted = source_image.copy()
    if syn.spec.spatial_dims == 3:
        box = _context_box(repaint, list(syn.spec.patch_size))
        out = repaint_batch(syn, labels[box][None], source_image[(slice(None), *box)][None], repaint[box][None],
                            sampler, generator, resample_jumps, spacing, class_stats)[0]
        painted[(slice(None), *box)] = out
        sampled = [[b.start, b.stop] for b in box]
    else:  # 2D synthesizers: the slices that hold region voxels, a batch at a time
        zs = np.flatnonzero(repaint.any(axis=(1, 2)))
        for k in range(0, len(zs), ALIGNED_SLICE_BATCH):
            z = zs[k:k + ALIGNED_SLICE_BATCH]
            out = repaint_batch(syn, labels[z], source_image[:, z].transpose(1, 0, 2, 3), repaint[z], sampler,
                                generator, resample_jumps, spacing, class_stats)
            painted[:, z] = out.transpose(1, 0, 2, 3)
        sampled = [int(z) for z in zs]
    weight = feather(repaint, margin)[None]
    image = np.where(repaint[None], weight * painted + (1 - weight) * source_image, source_image)
    return image.astype(np.float32), {"sampled_box" if syn.spec.spatial_dims == 3 else "sampled_slices": sampled}
