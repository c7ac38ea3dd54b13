"""Patch-level merging of real and synthetic samples (DiffBoost, Zhang et al., IEEE TMI 2024),
inside nnU-Net.

Each real training case is paired with a synthetic variant painted on that case's own label map
(an *aligned* variant, same voxel grid). The pair is loaded as one sample whose channels are
[real channels, synthetic channels], so nnU-Net's spatial augmentation moves both identically; the
trainer splits the channels again, runs the network on both halves and merges the *outputs*
patch by patch, as DiffBoost does:

    loss = DiceCE(M * f(x_real) + (1 - M) * f(x_synthetic), y_real)

M is a grid of patches, each real with probability alpha, upsampled nearest to every deep
supervision resolution.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.provenance import CASE_RECORDS_DIR

# keys of a synthetic case's record (diffaug_cases/<case>.json) that PatchMix relies on
SOURCE_CASE_KEY = "source_case"
ALIGNED_KEY = "aligned_with_source"


def aligned_variants(synthetic_raw_folder: str | Path, case_ids: list[str]) -> dict[str, list[str]]:
    """{real case: [synthetic cases painted on its unmodified label map]} from the case records."""
    variants: dict[str, list[str]] = {}
    records = Path(synthetic_raw_folder) / CASE_RECORDS_DIR
    for cid in case_ids:
        path = records / f"{cid}.json"
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise DiffAugError(f"{path} is not valid JSON.") from None
        if record.get(ALIGNED_KEY) and record.get(SOURCE_CASE_KEY):
            variants.setdefault(record[SOURCE_CASE_KEY], []).append(cid)
    return variants


class ChannelStack:
    """Same-shaped arrays stacked along the channel axis, lazily: only the cropped region is read."""

    def __init__(self, arrays):
        spatial = {tuple(a.shape[1:]) for a in arrays}
        if len(spatial) != 1:
            raise ValueError(f"ChannelStack needs equal spatial shapes, got {spatial}")
        self.arrays = arrays
        self.shape = (sum(a.shape[0] for a in arrays), *arrays[0].shape[1:])
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, slices):
        if not isinstance(slices, tuple):
            slices = (slices,)
        if slices and slices[0] != slice(None):
            raise IndexError("ChannelStack supports spatial indexing only (all channels)")
        return np.concatenate([np.asarray(a[slices], dtype=np.float32) for a in self.arrays], axis=0)


class PairedDataset:
    """Real training cases, each loaded together with one of its aligned synthetic variants."""

    def __init__(self, real, synthetic, variants: dict[str, list[str]]):
        missing = sorted(set(real.identifiers) - set(variants))
        if missing:
            raise DiffAugError(
                f"PatchMix needs an aligned synthetic variant of every training case; none exists for "
                f"{len(missing)} case(s): {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}. "
                f"Make them with: diffaug_synthesize ... --labels real-aligned")
        self.real = real
        self.synthetic = synthetic
        self.variants = {k: list(v) for k, v in variants.items() if k in set(real.identifiers)}
        self.identifiers = list(real.identifiers)

    def __getitem__(self, identifier):
        return self.load_case(identifier)

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self.real.load_case(identifier)
        variant = self.variants[identifier][np.random.randint(len(self.variants[identifier]))]
        synthetic_data = self.synthetic.load_case(variant)[0]
        if tuple(synthetic_data.shape[1:]) != tuple(data.shape[1:]):
            raise DiffAugError(f"Synthetic case {variant} is not aligned with {identifier}: preprocessed shapes "
                               f"{tuple(synthetic_data.shape[1:])} vs {tuple(data.shape[1:])}.")
        return ChannelStack([data, synthetic_data]), seg, seg_prev, properties


def patch_mask(batch_size: int, spatial_shape, patch_size, alpha: float, generator=None,
               device=None) -> torch.Tensor:
    """(B, 1, *spatial) float mask: a grid of patches, each 1 (real) with probability alpha."""
    grid = [max(1, int(np.ceil(s / p))) for s, p in zip(spatial_shape, patch_size)]
    coarse = (torch.rand((batch_size, 1, *grid), generator=generator) < alpha).float()
    full = coarse
    for axis, p in enumerate(patch_size):
        full = full.repeat_interleave(int(p), dim=2 + axis)
    crop = (slice(None), slice(None), *[slice(0, s) for s in spatial_shape])
    return full[crop].to(device) if device is not None else full[crop]


def merge_outputs(real_output, synthetic_output, mask: torch.Tensor):
    """M * real + (1 - M) * synthetic, at every deep-supervision scale (mask resized nearest)."""
    if isinstance(real_output, (list, tuple)):
        return [merge_outputs(r, s, mask) for r, s in zip(real_output, synthetic_output)]
    m = mask if mask.shape[2:] == real_output.shape[2:] else F.interpolate(mask, size=real_output.shape[2:],
                                                                           mode="nearest")
    m = m.to(real_output.dtype)
    return m * real_output + (1 - m) * synthetic_output


def merge_patch_size(value, training_patch) -> tuple[int, ...]:
    """'64', 64, '4,32,32' or (4, 32, 32) -> voxels per axis, each at most half the training patch
    (so that a training patch always holds several merge patches), at least 1."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise DiffAugError(f"Merge patch size {value!r} must be an integer or comma-separated integers.") from None
    values = list(value) if isinstance(value, (list, tuple)) else [int(value)] * len(training_patch)
    if len(values) == 1:
        values = values * len(training_patch)
    if len(values) != len(training_patch) or any(v < 1 for v in values):
        raise DiffAugError(f"Merge patch size {value!r} needs {len(training_patch)} positive value(s).")
    return tuple(max(1, min(int(v), int(t) // 2)) for v, t in zip(values, training_patch))


class PatchMixForward(torch.nn.Module):
    """Used only inside a training step: splits [real | synthetic] channels, runs the network once on
    both halves (stacked along the batch), and merges the outputs with a fresh patch mask."""

    def __init__(self, network: torch.nn.Module, num_input_channels: int, merge_patch, alpha: float):
        super().__init__()
        self.network = network
        self.c = num_input_channels
        self.merge_patch = merge_patch
        self.alpha = alpha

    def forward(self, x: torch.Tensor):
        if x.shape[1] != 2 * self.c:
            raise RuntimeError(f"PatchMix expects {2 * self.c} stacked channels, got {x.shape[1]}")
        b = x.shape[0]
        out = self.network(torch.cat([x[:, :self.c], x[:, self.c:]], dim=0))

        def split(o):
            return o[:b], o[b:]
        if isinstance(out, (list, tuple)):
            real, synthetic = zip(*[split(o) for o in out])
        else:
            real, synthetic = split(out)
        mask = patch_mask(b, x.shape[2:], self.merge_patch, self.alpha, device=x.device)
        return merge_outputs(list(real) if isinstance(out, (list, tuple)) else real,
                             list(synthetic) if isinstance(out, (list, tuple)) else synthetic, mask)
