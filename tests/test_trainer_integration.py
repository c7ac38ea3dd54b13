"""nnU-Net's own console scripts with our trainer: plan -> train (mixing) -> predict, 3d_fullres and 2d."""
import json
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from support import (EXAMPLE_ID, EXAMPLE_NAME, SMALL_PLANS, console_script, make_stand_in_synthetic_set,
                     nnunet_env, private_copy_of_example, run)

pytestmark = pytest.mark.slow
BUDGET = {"DIFFAUG_NUM_EPOCHS": 2, "DIFFAUG_ITERATIONS_PER_EPOCH": 8, "DIFFAUG_VAL_ITERATIONS": 2}


def _train(root, configuration, fold, trainer, expect_ok=True, **env_extra):
    env = nnunet_env(root, **BUDGET, **env_extra)
    return run([console_script("nnUNetv2_train"), str(EXAMPLE_ID), configuration, str(fold), "-tr", trainer,
                "-p", SMALL_PLANS, "-device", "cpu"], env, expect_ok=expect_ok)


def _output_folder(root, trainer, configuration, fold):
    return root / "results" / EXAMPLE_NAME / f"{trainer}__{SMALL_PLANS}__{configuration}" / f"fold_{fold}"


def _log_text(folder):
    logs = sorted(folder.glob("training_log_*.txt"))
    assert logs, f"no training log in {folder}"
    return logs[-1].read_text()


@pytest.fixture(scope="module")
def fold0_synthetic(planned_example, tmp_path_factory):
    source, splits = planned_example
    root = private_copy_of_example(source, tmp_path_factory.mktemp("trainer"))
    folder = make_stand_in_synthetic_set(root / "raw", EXAMPLE_NAME, 0, splits[0]["train"], 6, dataset_id=901)
    return root, splits, folder


def test_train_3d_with_mixing_then_predict(fold0_synthetic, tmp_path):
    root, splits, synth = fold0_synthetic
    trainer = "nnUNetTrainerDiffAug_r50"
    # nnUNet_n_proc_DA=1: real worker processes, so the trainer's loader and dataset must pickle
    _train(root, "3d_fullres", 0, trainer, nnUNet_n_proc_DA=1)
    out = _output_folder(root, trainer, "3d_fullres", 0)

    # nnU-Net used our trainer (it names the output folder after the class) and our ratio-aware loader
    debug = json.loads((out / "debug.json").read_text())
    assert "nnunet_diffaug.trainers.mixing.RatioDataLoader" in debug["dataloader_train.generator"]
    log = _log_text(out)
    assert f"6 synthetic case(s) from {synth}" in log
    # with batch size 2 and r = 0.5 every batch holds exactly one synthetic sample
    shares = re.findall(r"synthetic share drawn this epoch: ([0-9.]+) \((\d+)/(\d+) samples", log)
    assert len(shares) == BUDGET["DIFFAUG_NUM_EPOCHS"]
    assert all(float(s) == 0.5 and int(n) == 16 for s, _, n in shares)

    # validation is real-only: exactly the fold's real validation cases, no synthetic identifier
    validated = sorted(p.name[: -len(".nii.gz")] for p in (out / "validation").glob("*.nii.gz"))
    assert validated == sorted(splits[0]["val"])
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert {c["prediction_file"].split("/")[-1][: -len(".nii.gz")] for c in summary["metric_per_case"]} == \
        set(splits[0]["val"])
    assert (out / "checkpoint_final.pth").is_file()

    # the synthetic data live beside the real preprocessed data, never inside it
    real_folder = root / "preprocessed" / EXAMPLE_NAME / "nnUNetPlans_3d_fullres"
    assert not any(p.name.startswith("synth_") for p in real_folder.iterdir())

    # stock prediction works with the trained model
    inp, pred = tmp_path / "in", tmp_path / "pred"
    inp.mkdir()
    case = splits[0]["val"][0]
    shutil.copy(root / "raw" / EXAMPLE_NAME / "imagesTr" / f"{case}_0000.nii.gz", inp)
    run([console_script("nnUNetv2_predict"), "-i", str(inp), "-o", str(pred), "-d", str(EXAMPLE_ID), "-c",
         "3d_fullres", "-f", "0", "-tr", trainer, "-p", SMALL_PLANS, "-device", "cpu", "--disable_tta"],
        nnunet_env(root))
    seg = sitk.ReadImage(str(pred / f"{case}.nii.gz"))
    ref = sitk.ReadImage(str(root / "raw" / EXAMPLE_NAME / "imagesTr" / f"{case}_0000.nii.gz"))
    assert seg.GetSize() == ref.GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= set(range(6))


def test_train_2d_with_ratio_from_environment(fold0_synthetic):
    root, splits, _ = fold0_synthetic
    _train(root, "2d", 0, "nnUNetTrainerDiffAug", DIFFAUG_SYNTHETIC_RATIO=1.0, nnUNet_n_proc_DA=0)
    out = _output_folder(root, "nnUNetTrainerDiffAug", "2d", 0)
    log = _log_text(out)
    assert "synthetic share per batch r = 1.000" in log
    assert re.findall(r"synthetic share drawn this epoch: ([0-9.]+)", log) == ["1.000", "1.000"]
    assert sorted(p.name[:-7] for p in (out / "validation").glob("*.nii.gz")) == sorted(splits[0]["val"])


def test_fold_without_synthetic_set_is_refused_with_the_command_that_makes_one(fold0_synthetic):
    # r = 0 on such a fold trains exactly like stock: test_schedules.py::test_r0_with_a_schedule_trains_like_...
    root, splits, _ = fold0_synthetic
    refused = _train(root, "3d_fullres", 1, "nnUNetTrainerDiffAug", expect_ok=False, nnUNet_n_proc_DA=0)
    assert refused.returncode != 0
    assert "No synthetic dataset for Dataset990_ChestCTSlabs fold 1" in refused.stdout + refused.stderr
    assert "diffaug_train_synthesizer -d Dataset990_ChestCTSlabs -f 1" in refused.stdout + refused.stderr


@pytest.mark.parametrize("configuration", ["3d_lowres", "3d_cascade_fullres"])
def test_cascade_configurations_are_refused(planned_example, monkeypatch, configuration):
    import torch
    from nnunet_diffaug.errors import DiffAugError
    from nnunet_diffaug.trainers.nnUNetTrainerDiffAug import nnUNetTrainerDiffAug
    from support import set_nnunet_env
    root, _ = planned_example
    set_nnunet_env(monkeypatch, root)
    pre = root / "preprocessed" / EXAMPLE_NAME
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["configurations"]["3d_lowres"] = {"inherits_from": "3d_fullres", "next_stage": "3d_cascade_fullres"}
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    plans["continue_training"] = False
    with pytest.raises(DiffAugError, match=r"does not support cascade configurations \(" + configuration):
        nnUNetTrainerDiffAug(plans, configuration, 0, json.loads((pre / "dataset.json").read_text()),
                             torch.device("cpu"))
