"""Mirroring off from the environment, for label maps that name a side (left and right lung, kidney, ...).

nnU-Net flips every training patch along each spatial axis and, at inference, averages the prediction
over the flipped copies of the image. A network trained that way can tell the sides apart only from the
anatomy's own asymmetry, which with few training cases it often does not learn: on the built-in example
(``3d_fullres``, left and right lung are two classes, 5 training slabs) most runs find the lungs and give
about half of their voxels the wrong side, which made the lungs' Dice the noisiest numbers of every
benchmark; without mirroring, 4 of 6 such runs put 99-100 % of them on the correct side. nnU-Net ships
``nnUNetTrainerNoMirroring`` for such data; ``DIFFAUG_MIRRORING=0`` does the same for every trainer of this
package (``nnUNetTrainerBudget``, the benchmark's stock arm, and the DiffAug trainers): no mirroring in
training, none at inference (nnU-Net records the axes in the checkpoint, so ``nnUNetv2_predict`` follows).
Unset or 1, nothing changes.
"""
from __future__ import annotations

import re

from nnunet_diffaug.env_vars import MIRRORING, env_flag

_SIDE = re.compile(r"(?:^|[^a-z])(?:left|right)(?:[^a-z]|$)", re.IGNORECASE)
_LEFT = re.compile("left", re.IGNORECASE)


def mirroring_from_env() -> bool:
    return env_flag(MIRRORING, True)


def labels_naming_a_side(labels: dict) -> list[str]:
    """The label names of a dataset.json that say left or right (``right_lung``, ``Left-Thalamus``, ``kidney left``)."""
    return [name for name in labels if _SIDE.search(name)]


def side_pairs(labels: dict) -> list[tuple[str, str]]:
    """(left name, right name) for every label that says left and whose right-hand twin is a label too."""
    def to_right(name: str) -> str:
        return _LEFT.sub(lambda m: {"left": "right", "Left": "Right", "LEFT": "RIGHT"}.get(m[0], "right"), name)
    return [(name, to_right(name)) for name in labels_naming_a_side(labels)
            if _LEFT.search(name) and to_right(name) in labels]


def side_labels_note(labels: dict, mirroring: bool) -> str | None:
    """A note for datasets whose labels name a side while mirroring is on; None when there is nothing to say."""
    sided = labels_naming_a_side(labels)
    if not sided or not mirroring:
        return None
    return (f"labels {sided} name a side, and nnU-Net's mirroring (on) makes the sides hard to tell apart with few "
            f"training cases; consider {MIRRORING}=0 (diffaug_benchmark --no-mirroring, or "
            f"nnUNetTrainerNoMirroring for stock nnU-Net).")


class MirroringFromEnv:
    """Mixin for an nnUNetTrainer subclass: ``DIFFAUG_MIRRORING=0`` turns mirroring off, as nnUNetTrainerNoMirroring."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation_for_da, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not mirroring_from_env():
            mirror_axes = None
            self.inference_allowed_mirroring_axes = None
        note = side_labels_note(self.dataset_json.get("labels", {}), mirror_axes is not None)
        if note and not getattr(self, "_side_note_logged", False):
            self.print_to_log_file(f"DiffAug note: {note}")
            self._side_note_logged = True
        return rotation_for_da, do_dummy_2d_data_aug, initial_patch_size, mirror_axes
