"""Trainer variants read their settings from the environment once and refuse what they would ignore."""
import pytest

from nnunet_diffaug.errors import DiffAugError
from support import in_process_trainer, private_copy_of_example

NNUNET_ITERATIONS_PER_EPOCH = 250  # nnUNetTrainer's default


def test_5epochs_variant_scales_the_iterations_once(planned_example, tmp_path, monkeypatch):
    root = private_copy_of_example(planned_example[0], tmp_path)
    trainer = in_process_trainer(root, "nnUNetTrainerDiffAug_5epochs", 0, monkeypatch, DIFFAUG_NUM_EPOCHS="",
                                 DIFFAUG_ITERATIONS_PER_EPOCH="", DIFFAUG_ITERATION_SCALE=2)
    assert trainer.num_epochs == 5
    assert trainer.num_iterations_per_epoch == 2 * NNUNET_ITERATIONS_PER_EPOCH  # not 4x: the scale applies once
    trainer = in_process_trainer(root, "nnUNetTrainerDiffAug_5epochs", 0, monkeypatch, DIFFAUG_NUM_EPOCHS=3,
                                 DIFFAUG_ITERATIONS_PER_EPOCH=7, DIFFAUG_ITERATION_SCALE=2)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch) == (3, 14)  # an explicit budget still wins


def test_patch_mix_refuses_a_synthetic_ratio_it_would_ignore(planned_example, tmp_path, monkeypatch):
    root = private_copy_of_example(planned_example[0], tmp_path)
    with pytest.raises(DiffAugError, match=r"DIFFAUG_SYNTHETIC_RATIO=0.5 would be ignored"):
        in_process_trainer(root, "nnUNetTrainerDiffAugPatchMix", 0, monkeypatch, DIFFAUG_SYNTHETIC_RATIO=0.5)
    trainer = in_process_trainer(root, "nnUNetTrainerDiffAugPatchMix", 0, monkeypatch, DIFFAUG_SYNTHETIC_RATIO=0)
    assert trainer.synthetic_ratio == 0.0 and trainer.patch_mix_alpha == pytest.approx(0.6)
