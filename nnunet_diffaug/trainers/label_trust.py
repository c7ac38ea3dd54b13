"""Classes whose synthetic labels are not trusted: ignored in the loss on synthetic samples only.

A synthesizer that paints a thin structure (ribs, vessels) too blurred to see still writes its label,
so a synthetic sample teaches "this label on nothing visible" and the segmentation network learns to
miss the structure on real images (measured on the example: ribs fell from 0.36 to 0.00 Dice while
the lungs gained). Ignoring such classes on synthetic samples keeps what the synthetic cases teach
about every other class and leaves the untrusted class to the real cases.

Mechanism: nnU-Net's own ignore-label path. On synthetic samples the voxels of an untrusted class get
the ignore value; the loss (Dice and cross-entropy) skips them. Real samples never carry that value,
so their loss is nnU-Net's loss unchanged. ``diffaug_evaluate`` measures per-class label fidelity,
which tells which classes to name.
"""
from __future__ import annotations

import numpy as np
import torch

from nnunet_diffaug.errors import DiffAugError


def parse_untrusted_classes(spec: str | tuple | list, labels: dict, source: str) -> tuple[int, ...]:
    """Class names or label values ('ribs', '1', 'ribs,spine') -> sorted foreground label values.

    ``labels`` is dataset.json's name -> value map; ``source`` names where the spec came from (for errors).
    """
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    by_name = {name: value for name, value in labels.items() if isinstance(value, int)}
    foreground = {v for n, v in by_name.items() if v != 0 and n != "ignore"}
    chosen = set()
    for item in items:
        value = by_name.get(item, int(item) if item.lstrip("-").isdigit() else None)
        if value is None or value not in foreground:
            known = ", ".join(f"{n} ({v})" for n, v in sorted(by_name.items(), key=lambda x: x[1])
                              if v in foreground)
            raise DiffAugError(f"{source}: {item!r} is not a foreground class of this dataset; its classes are {known}.")
        chosen.add(value)
    return tuple(sorted(chosen))


def ignore_value(label_manager) -> int:
    """The dataset's own ignore label if it declares one, else one above its highest label (nnU-Net's
    convention: the ignore label is the highest value)."""
    if label_manager.ignore_label is not None:
        return int(label_manager.ignore_label)
    return int(max(label_manager.all_labels)) + 1


def loss_with_ignore_value(loss, value: int):
    """Makes nnU-Net's DC_and_CE_loss skip voxels of ``value`` (Dice mask and cross-entropy ignore_index).
    A loss without that value in its targets computes exactly what it computed before."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    inner = loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss
    if not isinstance(inner, DC_and_CE_loss):
        raise DiffAugError(f"Untrusted synthetic classes need nnU-Net's DC_and_CE_loss; this trainer builds "
                           f"{type(inner).__name__}.")
    if inner.ignore_label is not None and inner.ignore_label != value:
        raise DiffAugError(f"The loss already ignores label {inner.ignore_label}, not {value}.")
    inner.ignore_label = value
    inner.ce.ignore_index = value
    return loss


def mask_untrusted(target: torch.Tensor | list, synthetic: list[bool], classes: tuple[int, ...], value: int):
    """Sets the untrusted classes of the synthetic samples (batch rows) to ``value``, in place, at every
    deep-supervision scale. Returns the number of voxels changed at full resolution."""
    scales = target if isinstance(target, (list, tuple)) else [target]
    rows = torch.as_tensor(np.flatnonzero(synthetic), dtype=torch.long)
    if not len(rows) or not classes:
        return 0
    lookup = torch.as_tensor(classes, dtype=scales[0].dtype)
    changed = 0
    for i, t in enumerate(scales):
        part = t[rows]
        hit = torch.isin(part, lookup.to(part.device))
        if i == 0:
            changed = int(hit.sum())
        part[hit] = value
        t[rows] = part
    return changed
