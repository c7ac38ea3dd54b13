"""DIFFAUG_MIRRORING=0: nnU-Net's mirroring off in training and at inference, for the stock (budget) trainer and
ours alike, as nnU-Net's own nnUNetTrainerNoMirroring; the benchmark's --no-mirroring sets it for every arm."""
from pathlib import Path

import pytest
import torch
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.trainers.mirroring import labels_naming_a_side, side_labels_note, side_pairs
from support import in_process_trainer, private_copy_of_example


def test_labels_that_name_a_side_are_found_and_only_those():
    labels = {"background": 0, "right_lung": 1, "Left-Thalamus": 2, "kidney left": 3, "bright_spot": 4,
              "leftover": 5, "spine": 6}
    assert labels_naming_a_side(labels) == ["right_lung", "Left-Thalamus", "kidney left"]
    assert "consider DIFFAUG_MIRRORING=0" in side_labels_note(labels, mirroring=True)
    assert side_labels_note(labels, mirroring=False) is None
    assert side_labels_note({"background": 0, "liver": 1}, mirroring=True) is None
    # the pairs whose sides can be confused (benchmarks/side_confusion.py merges them)
    labels["Right-Thalamus"], labels["left_kidney"] = 7, 8
    labels["left_lung"] = 9
    assert side_pairs(labels) == [("Left-Thalamus", "Right-Thalamus"), ("left_lung", "right_lung")]


def _transform_types(transform) -> set[type]:
    """Every transform class in nnU-Net's (nested) training pipeline."""
    found = {type(transform)}
    for child in getattr(transform, "transforms", []) or []:
        found |= _transform_types(child)
    if getattr(transform, "transform", None) is not None:   # RandomTransform wraps one
        found |= _transform_types(transform.transform)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("trainer_name, env", [("nnUNetTrainerBudget", {}),
                                               ("nnUNetTrainerDiffAug", {"DIFFAUG_SYNTHETIC_RATIO": 0})])
def test_mirroring_off_trains_and_predicts_without_flips(planned_example, tmp_path, monkeypatch, trainer_name, env):
    torch.set_num_threads(1)
    root = private_copy_of_example(planned_example[0], tmp_path)
    seen = {}
    for mirroring in ("1", "0"):
        trainer = in_process_trainer(root, trainer_name, 0, monkeypatch, DIFFAUG_NUM_EPOCHS=1,
                                     DIFFAUG_ITERATIONS_PER_EPOCH=1, DIFFAUG_MIRRORING=mirroring, **env)
        trainer.run_training()
        pipeline = _transform_types(trainer.dataloader_train.data_loader.transforms)
        checkpoint = torch.load(Path(trainer.output_folder) / "checkpoint_final.pth", map_location="cpu",
                                weights_only=False)
        log = sorted(Path(trainer.output_folder).glob("training_log_*.txt"))[-1].read_text()
        seen[mirroring] = (MirrorTransform in pipeline, checkpoint["inference_allowed_mirroring_axes"],
                           log.count("name a side"))
    # nnU-Net's default: every patch flipped along all three axes, and the predictor averages over the flips;
    # the example's lungs are labelled right_lung and left_lung, so the log says so once
    assert seen["1"] == (True, (0, 1, 2), 1)
    # off: no flip in training, and the checkpoint tells nnUNetv2_predict not to mirror either
    assert seen["0"] == (False, None, 0)


@pytest.mark.slow
def test_a_bad_mirroring_value_is_refused_naming_the_variable(planned_example, tmp_path, monkeypatch):
    root = private_copy_of_example(planned_example[0], tmp_path)
    trainer = in_process_trainer(root, "nnUNetTrainerBudget", 0, monkeypatch, DIFFAUG_MIRRORING="sometimes")
    with pytest.raises(DiffAugError, match="DIFFAUG_MIRRORING='sometimes'"):
        trainer.run_training()
