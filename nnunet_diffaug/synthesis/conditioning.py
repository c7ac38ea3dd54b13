"""What the image model is conditioned on: the label map, and optionally an edge hint and tags.

- Label map: one-hot class channels at full resolution (always).
- Edge hint (DiffBoost, Zhang et al., IEEE TMI 2024; ``diffusion.edge_hint``): one more spatial channel. It always holds the label
  map's boundaries; when a real image belongs to the label map (``--labels real`` / ``real-aligned``)
  it also holds that image's strongest intensity edges, so the painted image keeps the real
  case's inner structure (vessels, texture borders) that the labels do not describe. Seed (d) used
  HED edges, whose network needs downloaded weights; here image edges are gradient magnitudes
  above a per-sample quantile. Training drops the image part for a share of samples, so the model
  also paints from label boundaries alone (generated label maps have no image).
- Tags (``diffusion.tag_conditioning``): learned embeddings of the input channel names (the
  modality: 'CT', 'T2', ...) and of the source case's acquisition spacing, i.e. its original
  spacing before nnU-Net resampled it: a coarse acquisition looks blurred after resampling, and the
  spacing tag lets the model paint that, or not, on request. The tag vector is broadcast as
  constant channels of the spatial condition, so SPADE turns it into a global scale and shift of
  every normalisation layer (FiLM), and ControlNet into residuals: a strong path that both
  conditionings share. (Cross-attention was tried first: MONAI zero-initialises its output
  projection and tiny models never learned to use it.) Channel-name embeddings are constant
  within one dataset: they name what the model paints.
- Class intensity (``diffusion.class_intensity``, see :mod:`class_stats`): 2 x C + 1 spatial
  channels holding, on each class's voxels, that class's mean and sd of the normalised image in a
  real case, and a flag where they are given. Training zeroes them for a share of samples, so the
  model also paints without them.
- "No label" (``diffusion.null_label``): one last channel, 0 for a label map, and 1 (with every other
  spatial channel 0) for a sample without one: unlabelled images (``--unlabeled``) train the model on
  this learned null condition, and sampling can then guide towards the label map (classifier-free
  guidance, Ho & Salimans, "Classifier-Free Diffusion Guidance", arXiv 2207.12598, 2022).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_diffaug.synthesis.class_stats import stats_channels_count, stats_maps

EDGE_QUANTILE = 0.9           # the strongest 10% of gradient magnitudes count as image edges
_QUANTILE_MAX_ELEMENTS = 2**20  # torch.quantile refuses > 2**24 elements; a strided subsample is plenty


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 1, *spatial) class indices -> (B, num_classes, *spatial) float one-hot."""
    shape = list(labels.shape)
    shape[1] = num_classes
    out = torch.zeros(shape, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.long(), 1.0)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    pool = F.max_pool3d if x.ndim == 5 else F.max_pool2d
    return pool(x, kernel_size=3, stride=1, padding=1)


def label_boundaries(labels: torch.Tensor) -> torch.Tensor:
    """(B, 1, *spatial) class indices -> (B, 1, *spatial) 1.0 where a neighbour has another class."""
    x = labels.float()
    return (_max_pool(x) != -_max_pool(-x)).float()


def image_edges(images: torch.Tensor, quantile: float = EDGE_QUANTILE) -> torch.Tensor:
    """(B, C, *spatial) images -> (B, 1, *spatial) binary edges: gradient magnitude above its quantile.

    The image is smoothed by a 3-voxel box first, so single noisy voxels do not count as edges.
    A flat image has no edges.
    """
    spatial_dims = images.ndim - 2
    avg = F.avg_pool3d if spatial_dims == 3 else F.avg_pool2d
    smooth = avg(images.float(), kernel_size=3, stride=1, padding=1, count_include_pad=False)
    grads = torch.gradient(smooth, dim=tuple(range(2, images.ndim)))
    magnitude = torch.sqrt(sum(g * g for g in grads)).amax(dim=1, keepdim=True)
    flat = magnitude.flatten(1)
    stride = max(1, flat.shape[1] // _QUANTILE_MAX_ELEMENTS)
    threshold = torch.quantile(flat[:, ::stride], quantile, dim=1)
    threshold = threshold.clamp_min(1e-6).view(-1, *[1] * (images.ndim - 1))
    return (magnitude > threshold).float()


def edge_hint(labels: torch.Tensor, images: torch.Tensor | None = None,
              use_image: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, *spatial): label boundaries, united with image edges where an image is given.

    ``use_image``: optional (B,) booleans; samples marked False get label boundaries only.
    """
    hint = label_boundaries(labels)
    if images is None:
        return hint
    edges = image_edges(images)
    if use_image is not None:
        edges = edges * use_image.to(edges.device, edges.dtype).view(-1, *[1] * (edges.ndim - 1))
    return torch.maximum(hint, edges)


def spatial_condition(labels: torch.Tensor, num_classes: int, with_edge_hint: bool,
                      images: torch.Tensor | None = None, use_image: torch.Tensor | None = None,
                      class_intensity_channels: int = 0, class_stats: torch.Tensor | None = None) -> torch.Tensor:
    """The spatial input of the image model: one-hot labels, plus the edge hint channel if configured,
    plus the class-intensity maps if ``class_intensity_channels`` (the image's channel count) > 0.

    ``class_stats``: (B, K, C, 2) per-class mean and sd (NaN rows: unknown); None = none known."""
    parts = [one_hot(labels, num_classes)]
    if with_edge_hint:
        parts.append(edge_hint(labels, images, use_image))
    if class_intensity_channels:
        parts.append(stats_maps(labels, class_stats, class_intensity_channels))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def condition_channels(num_classes: int, with_edge_hint: bool, tag_dim: int = 0,
                       class_intensity_channels: int = 0, null_label: bool = False) -> int:
    stats = stats_channels_count(class_intensity_channels) if class_intensity_channels else 0
    return num_classes + (1 if with_edge_hint else 0) + tag_dim + stats + (1 if null_label else 0)


def with_null_label(spatial: torch.Tensor, unlabeled: torch.Tensor | None = None) -> torch.Tensor:
    """Appends the "no label" channel to a spatial condition: 0 for label maps; for the samples marked in
    ``unlabeled`` (B,) booleans, the null condition instead (every other channel 0, the flag 1)."""
    flag = torch.zeros_like(spatial[:, :1])
    out = torch.cat([spatial, flag], dim=1)
    if unlabeled is not None and bool(unlabeled.any()):
        mask = unlabeled.to(out.device, torch.bool)
        out[mask] = null_spatial(out[mask])
    return out


def null_spatial(spatial: torch.Tensor) -> torch.Tensor:
    """The null condition shaped like ``spatial`` (whose last channel is the "no label" flag)."""
    out = torch.zeros_like(spatial)
    out[:, -1] = 1.0
    return out


@dataclass
class Condition:
    """Everything one forward pass of the image model is conditioned on."""
    spatial: torch.Tensor                 # (B, classes [+ edge hint] [+ class intensity], *spatial)
    spacing: torch.Tensor | None = None   # (B, 3) acquisition spacing in mm; a NaN row = no tag

    def to(self, device) -> "Condition":
        return Condition(self.spatial.to(device), None if self.spacing is None else self.spacing.to(device))


class TagEncoder(nn.Module):
    """Tags -> one vector per sample (B, dim): the channel names' embeddings plus the spacing's.

    Spacing enters as log(spacing / reference), the reference being the training cases' median
    (a buffer, so it travels with the weights). A NaN spacing row gets a learned 'no spacing'
    vector: training drops tags at random so the model can paint without them.
    """

    def __init__(self, num_channels: int, dim: int):
        super().__init__()
        self.channel_names = nn.Embedding(num_channels, dim)
        self.spacing_mlp = nn.Sequential(nn.Linear(3, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.no_spacing = nn.Parameter(torch.zeros(dim))
        self.register_buffer("reference_log_spacing", torch.zeros(3))

    def set_reference_spacing(self, spacing: list[float]) -> None:
        self.reference_log_spacing.copy_(torch.log(torch.as_tensor(spacing, dtype=torch.float32)))

    def spacing_embedding(self, spacing: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        device = self.no_spacing.device
        if spacing is None:
            spacing = torch.full((batch_size, 3), float("nan"), device=device)
        spacing = spacing.to(device, torch.float32)
        known = torch.isfinite(spacing).all(dim=1, keepdim=True)
        safe = torch.where(known, spacing, torch.ones_like(spacing)).clamp_min(1e-6)
        embedded = self.spacing_mlp(torch.log(safe) - self.reference_log_spacing)
        return torch.where(known, embedded, self.no_spacing.expand_as(embedded))

    def forward(self, spacing: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        return self.channel_names.weight.sum(dim=0) + self.spacing_embedding(spacing, batch_size)

    def as_channels(self, spacing: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The tag vector as constant channels shaped like ``like`` (B, *, *spatial)."""
        vector = self(spacing, like.shape[0]).to(like.dtype)
        return vector.view(*vector.shape, *[1] * (like.ndim - 2)).expand(-1, -1, *like.shape[2:])
