"""Mirroring off from the environment, for label maps that name a side (left and right lung, kidney, ...).

nnU-Net flips every training patch along each spatial axis and, at inference, averages the prediction
over the flipped copies of the image. A network trained that way cannot learn which side is which: on the
built-in example (left and right lung are two classes) nearly every lung voxel is found, but split between
the two lung classes at random from run to run, which made the left lung's Dice the noisiest number of every
benchmark. nnU-Net ships ``nnUNetTrainerNoMirroring`` for such data; ``DIFFAUG_MIRRORING=0`` does the same
for every trainer of this package (``nnUNetTrainerBudget``, the benchmark's stock arm, and the DiffAug
trainers): no mirroring in training, none at inference (nnU-Net records the axes in the checkpoint, so
``nnUNetv2_predict`` follows). Unset or 1, nothing changes.
"""
from __future__ import annotations

from nnunet_diffaug.trainers.budget import env_flag

MIRRORING_ENV = "DIFFAUG_MIRRORING"


def mirroring_from_env() -> bool:
    return env_flag(MIRRORING_ENV, True)


class MirroringFromEnv:
    """Mixin for an nnUNetTrainer subclass: ``DIFFAUG_MIRRORING=0`` turns mirroring off, as nnUNetTrainerNoMirroring."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation_for_da, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not mirroring_from_env():
            mirror_axes = None
            self.inference_allowed_mirroring_axes = None
        return rotation_for_da, do_dummy_2d_data_aug, initial_patch_size, mirror_axes
