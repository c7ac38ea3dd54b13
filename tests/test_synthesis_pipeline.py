"""End to end: train synthesizers on the real chest CT (tiny preset, CPU), then write synthetic datasets.

One 2D SPADE synthesizer is trained once for the module (about 1.5 min on 2 cores) and reused;
the 3D run doubles as the kill-and-resume test; a short ControlNet run checks that option.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.utilities.crossval_split import generate_crossval_split

from support import (EXAMPLE_ID, EXAMPLE_NAME, console_script, nnunet_env, nnunet_folders, private_copy_of_example)

from nnunet_diffaug import cli
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.paths import synthesizer_folder
from nnunet_diffaug.provenance import read_provenance
from nnunet_diffaug.raw_dataset import ensure_default_split, list_cases
from nnunet_diffaug.synthesis.checkpoint import load_checkpoint, read_state
from nnunet_diffaug.synthesis.data import FoldData
from voxel_classifier import VoxelClassifier, label_fidelity
from nnunet_diffaug.synthesis.synthesizer import Synthesizer

pytestmark = pytest.mark.slow

# the chest CT's classes by intensity: air-like (background, both lungs), bone (ribs, spine), soft tissue
INTENSITY_GROUPS = [[0, 3, 4], [1, 2], [5]]


@pytest.fixture(scope="module")
def root(planned_example, tmp_path_factory):
    """A private copy of the planned example (raw + preprocessed), with nnU-Net's env pointing at it."""
    with nnunet_folders(private_copy_of_example(planned_example[0], tmp_path_factory.mktemp("synthesis"))) as dst:
        yield dst


@pytest.fixture(scope="module")
def trained_2d(root):
    cli.train_synthesizer_entry(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "2d", "--preset", "tiny", "-device", "cpu",
                                 "--seed", "0"])
    return synthesizer_folder(EXAMPLE_NAME, "2d", 0)


def _losses(folder: Path, stage: str) -> dict[str, list[float]]:
    return read_state(folder / f"{stage}.safetensors")["losses"]


def _case_arrays(folder: Path, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr" / f"{case_id}_0000.nii.gz")))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case_id}.nii.gz")))
    return img, lab


def _verify_integrity(folder: Path) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem


def _loads_in_diffaug_trainer(folder: Path, configuration: str, fold: int, root: Path) -> None:
    """The trainer side's own checks and preprocessing with the REAL plans accept the synthetic set."""
    from nnunet_diffaug.raw_dataset import load_dataset_json
    from nnunet_diffaug.trainers.preprocess import preprocess_synthetic_cases
    from nnunet_diffaug.trainers.synthetic_source import real_image_dimension, validate_synthetic_dataset
    real_json = load_dataset_json(root / "raw" / EXAMPLE_NAME)
    pre = root / "preprocessed" / EXAMPLE_NAME
    splits = json.loads((pre / "splits_final.json").read_text())
    cases = validate_synthetic_dataset(folder, real_json, EXAMPLE_NAME, fold, configuration, splits[fold]["val"],
                                       is_3d=configuration != "2d")
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    done = preprocess_synthetic_cases(folder, real_json, plans, configuration, root / "tmp_pre" / folder.name,
                                      verbose=False, expected_dimension=real_image_dimension(EXAMPLE_NAME))
    assert done == cases


# ---------------------------------------------------------------------------------------------- training

def test_training_lowers_both_losses_far_below_their_start(trained_2d):
    ae = _losses(trained_2d, "autoencoder")["l1"]
    dm = _losses(trained_2d, "diffusion")["mse"]
    assert np.mean(ae[-20:]) < 0.4 * np.mean(ae[:20])
    assert np.mean(dm[-20:]) < 0.2 * np.mean(dm[:20])
    for name in ("autoencoder_losses.png", "autoencoder_montage.png", "diffusion_losses.png",
                 "diffusion_montage.png", "config.json", "synthesizer.json", "training_log.txt"):
        assert (trained_2d / name).is_file(), name
    assert not list(trained_2d.glob("*_checkpoint.safetensors"))  # finished stages keep final weights only


def test_rerun_of_a_finished_training_skips_both_stages(trained_2d):
    before = {p.name: p.stat().st_mtime_ns for p in trained_2d.glob("*.safetensors")}
    cli.train_synthesizer_entry(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "2d", "--preset", "tiny", "-device", "cpu"])
    assert before == {p.name: p.stat().st_mtime_ns for p in trained_2d.glob("*.safetensors")}
    assert "finished earlier, skipped" in (trained_2d / "training_log.txt").read_text()


def test_trained_images_follow_their_label_maps_and_untrained_ones_do_not(trained_2d, root):
    data = FoldData(EXAMPLE_ID, "2d", 0)
    splits = json.loads((data.folder / "splits_final.json").read_text())
    real_train = [(np.asarray(data.case(c)[0][0][...]), data.label_volume(c)) for c in data.training_cases]
    slices = [(img[z], lab[z]) for img, lab in real_train for z in range(img.shape[0])]
    clf = VoxelClassifier.fit([s[0] for s in slices], [s[1] for s in slices])

    # conditioning label maps the synthesizer never saw: the fold's validation cases
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    val = nnUNetDatasetBlosc2(str(data.data_folder), identifiers=splits[0]["val"])
    labels = []
    for c in splits[0]["val"]:
        seg = data.encode_labels(np.asarray(val.load_case(c)[1][0][...]))
        labels += [seg[z] for z in range(seg.shape[0])]

    trained = Synthesizer.load(trained_2d, torch.device("cpu"))
    untrained = Synthesizer(trained.config, trained.spec, torch.device("cpu"))
    scores = {}
    for name, syn in (("trained", trained), ("untrained", untrained)):
        gen = torch.Generator().manual_seed(0)
        images = [syn.generate(lab[None], syn.sampler(), gen)[0, 0] for lab in labels]
        scores[name] = label_fidelity(clf, images, labels, INTENSITY_GROUPS)
    print("label fidelity (grouped Dice of a real-fitted voxel classifier):", scores)
    # measured on 2 CPU cores: trained 0.77, untrained 0.26 (real validation images: 0.93)
    assert scores["trained"] > 0.55
    assert scores["untrained"] < 0.35
    assert scores["trained"] > scores["untrained"] + 0.25


# ---------------------------------------------------------------------------------------------- synthesis

def test_synthesized_2d_dataset_is_valid_resumable_and_reproducible(trained_2d, root):
    raw = root / "raw"
    cli.synthesize_entry(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "2d", "-n", "4", "-o", "950", "--seed", "3",
                          "-device", "cpu"])
    out = raw / "Dataset950_ChestCTSlabsSynthF0"
    _verify_integrity(out)
    _loads_in_diffaug_trainer(out, "2d", 0, root)
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["numTraining"] == 4 and dj["labels"] == json.loads((raw / EXAMPLE_NAME / "dataset.json").read_text())["labels"]
    prov = read_provenance(out)
    data = FoldData(EXAMPLE_ID, "2d", 0)
    assert prov.source_dataset == EXAMPLE_NAME and prov.fold == 0 and prov.seed == 3
    assert prov.training_cases == data.training_cases
    assert len(prov.generator["checkpoint_sha256"]) == 64 and prov.generator["sampler"] == "dpmpp"
    real_img = sitk.ReadImage(str(raw / EXAMPLE_NAME / "imagesTr" / "chest_001_0000.nii.gz"))
    for i in range(4):
        record = json.loads((out / "diffaug_cases" / f"synth_{i:05d}.json").read_text())
        assert record["source_case"] in data.training_cases
        img, lab = _case_arrays(out, f"synth_{i:05d}")
        assert img.shape[0] == 1 and img.shape[1:] == (64, 64)  # one slice, in-plane like the real data
        assert set(np.unique(lab).tolist()) <= set(range(6))
        assert -1100 < img.min() and img.max() < 2200  # CT written in HU, within the training range
        spacing = sitk.ReadImage(str(out / "imagesTr" / f"synth_{i:05d}_0000.nii.gz")).GetSpacing()
        assert np.allclose(spacing, real_img.GetSpacing(), rtol=1e-3)

    # a rerun keeps complete cases; more cases extend the dataset
    mtime = (out / "labelsTr" / "synth_00000.nii.gz").stat().st_mtime_ns
    cli.synthesize_entry(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "2d", "-n", "5", "-o", "950", "--seed", "3",
                          "-device", "cpu"])
    assert (out / "labelsTr" / "synth_00000.nii.gz").stat().st_mtime_ns == mtime
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 5

    # the same seed in two shards of another dataset gives the same cases
    for part in ("1", "0"):
        cli.synthesize_entry(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "2d", "-n", "4", "-o", "951", "--seed", "3",
                              "-num_parts", "2", "-part_id", part, "-device", "cpu"])
    sharded = raw / "Dataset951_ChestCTSlabsSynthF0"
    for i in range(4):
        a, b = _case_arrays(out, f"synth_{i:05d}"), _case_arrays(sharded, f"synth_{i:05d}")
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # cases differ from each other (augmented label maps, new noise)
    assert not np.array_equal(_case_arrays(out, "synth_00000")[1], _case_arrays(out, "synth_00004")[1])


def test_synthesis_calibrates_every_structure_to_its_source_cases_intensity_by_default(trained_2d, root):
    raw = root / "raw"
    folders = {}
    for out_id, extra in (("952", ["--no-calibrate-intensity"]), ("953", [])):
        cli.synthesize_entry(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "2d", "-n", "2", "-o", out_id, "--seed", "4",
                              "--labels", "real-aligned", "-device", "cpu", *extra])
        folders[out_id] = raw / f"Dataset{out_id}_ChestCTSlabsSynthF0"
    plain, calibrated = folders["952"], folders["953"]
    assert read_provenance(calibrated).generator["calibrate_intensity"] is True
    assert "calibrate_intensity" not in read_provenance(plain).generator
    for i in range(2):
        case = f"synth_{i:05d}"
        record = json.loads((calibrated / "diffaug_cases" / f"{case}.json").read_text())
        source = record["source_case"]
        src_img = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / EXAMPLE_NAME / "imagesTr" / f"{source}_0000.nii.gz")))
        (img0, lab), (img1, lab1) = _case_arrays(plain, case), _case_arrays(calibrated, case)
        assert np.array_equal(lab, lab1) and img1.shape == src_img.shape  # the source's grid and labels
        assert np.array_equal(img0[lab == 0], img1[lab == 0])  # background stays as painted
        present = [k for k in range(1, 6) if (lab == k).any()]
        for k in present:
            real, before, after = (float(a[lab == k].mean()) for a in (src_img, img0, img1))
            assert abs(after - real) < 25 + 0.25 * abs(before - real), (k, real, before, after)
        assert set(record["intensity_calibration"]["classes"]) == {str(k) for k in present} and len(present) >= 3


def test_synthesis_refuses_bad_requests(trained_2d, root, capsys):
    with pytest.raises(DiffAugError, match="no synthesizer was trained here"):
        cli.synthesize_entry.__wrapped__(["-d", str(EXAMPLE_ID), "-f", "1", "-c", "2d", "-n", "2"])
    with pytest.raises(DiffAugError, match="-num_parts > 1 pass --output-dataset"):
        cli.synthesize_entry.__wrapped__(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "2d", "-n", "2", "--seed", "9",
                                          "-num_parts", "2", "-part_id", "0"])
    with pytest.raises(SystemExit) as e:  # the console script prints one line and exits 2
        cli.synthesize_entry(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "2d", "-n", "2", "-num_parts", "2",
                              "-part_id", "2"])
    assert e.value.code == 2 and "ERROR:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- refusals

def test_training_refuses_unknown_fold_and_missing_inputs(root, tmp_path):
    with pytest.raises(DiffAugError, match="fold 7 does not exist"):
        cli.train_synthesizer_entry.__wrapped__(["-d", str(EXAMPLE_ID), "-f", "7", "-c", "2d", "--preset", "tiny"])
    with pytest.raises(DiffAugError, match="no configuration '3d_lowres'"):
        cli.train_synthesizer_entry.__wrapped__(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "3d_lowres", "--preset", "tiny"])
    with pytest.raises(DiffAugError, match="NoSuchPlans.json does not exist"):
        cli.train_synthesizer_entry.__wrapped__(["-d", str(EXAMPLE_ID), "-f", "0", "-plans", "NoSuchPlans"])
    # a dataset that was planned but has no split yet: nnU-Net's own default split is written, as
    # nnUNetv2_train would (so the synthesizer's fold is the fold nnU-Net later trains); too few cases are refused
    pre = root / "preprocessed" / EXAMPLE_NAME
    splits = pre / "splits_final.json"
    saved = splits.read_text()
    splits.unlink()
    try:
        data = FoldData(EXAMPLE_ID, "3d_fullres", 1)
        expected = generate_crossval_split(sorted(list_cases(root / "raw" / EXAMPLE_NAME)), seed=12345, n_splits=5)
        assert json.loads(splits.read_text()) == expected
        assert data.training_cases == sorted(expected[1]["train"])
        splits.unlink()
        four_cases = tmp_path / "four_cases"
        four_cases.mkdir()
        for c in "abcd":
            (four_cases / f"{c}.b2nd").touch()
            (four_cases / f"{c}_seg.b2nd").touch()
        with pytest.raises(DiffAugError, match="at least 5 cases"):
            ensure_default_split(pre, four_cases)
        assert not splits.exists()
    finally:
        splits.write_text(saved)
    # preprocessed data of the configuration missing
    data_dir = pre / "nnUNetPlans_3d_fullres"
    hidden = pre / "hidden_3d"
    data_dir.rename(hidden)
    try:
        with pytest.raises(DiffAugError, match="nnUNetPlans_3d_fullres does not exist"):
            cli.train_synthesizer_entry.__wrapped__(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "3d_fullres",
                                                     "--preset", "tiny"])
    finally:
        hidden.rename(data_dir)


# ---------------------------------------------------------------------------------------------- 3D: kill, resume

def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(read_state(path)["step"])
    except Exception:
        return None


def test_3d_training_killed_mid_stage_resumes_from_its_checkpoint(root, tmp_path):
    config = tmp_path / "short3d.json"
    config.write_text(json.dumps({"base": "tiny", "autoencoder": {"steps": 60},
                                  "diffusion": {"steps": 40, "scale_factor_batches": 4}, "checkpoint_every": 10,
                                  "montage_cases": 2}))
    cmd = [console_script("diffaug_train_synthesizer"), "-d", str(EXAMPLE_ID), "-f", "0", "-c", "3d_fullres",
           "--preset", str(config), "-device", "cpu", "--seed", "1"]
    env = nnunet_env(root)
    folder = synthesizer_folder(EXAMPLE_NAME, "3d_fullres", 0)
    ckpt_file = folder / "autoencoder_checkpoint.safetensors"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and (_checkpoint_step(ckpt_file) or 0) < 20:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: like a crash or a pulled plug
    finally:
        proc.wait()
    killed_at = _checkpoint_step(ckpt_file)
    assert killed_at is not None and 20 <= killed_at < 60
    assert not (folder / "autoencoder.safetensors").exists()
    losses_at_kill = read_state(ckpt_file)["losses"]["l1"]

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (folder / "training_log.txt").read_text()
    assert f"autoencoder: resuming from step {killed_at} of 60" in log
    losses = read_state(folder / "autoencoder.safetensors")["losses"]["l1"]
    assert len(losses) == 60 and losses[:killed_at] == losses_at_kill  # continued, not restarted
    assert (folder / "diffusion.safetensors").is_file()

    # the 3D synthesizer writes valid 3D cases, on the real data's grid
    cli.synthesize_entry(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "3d_fullres", "-n", "2", "-o", "960",
                          "--steps", "4", "-device", "cpu"])
    out = root / "raw" / "Dataset960_ChestCTSlabsSynthF0"
    _verify_integrity(out)
    _loads_in_diffaug_trainer(out, "3d_fullres", 0, root)
    img, lab = _case_arrays(out, "synth_00000")
    assert img.shape == lab.shape == (4, 64, 64)

    # a different config for the same fold is refused, not silently mixed
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"base": "tiny", "autoencoder": {"steps": 61}}))
    with pytest.raises(DiffAugError, match="different config"):
        cli.train_synthesizer_entry.__wrapped__(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "3d_fullres",
                                                 "--preset", str(other), "-device", "cpu", "--seed", "1"])


# ---------------------------------------------------------------------------------------------- ControlNet

def test_controlnet_adversarial_autoencoder_and_class_balanced_losses_train_and_synthesize(root, tmp_path):
    config = tmp_path / "controlnet.json"
    config.write_text(json.dumps({"base": "tiny",
                                  "autoencoder": {"steps": 20, "adversarial_weight": 0.01, "class_balance_max_weight": 10},
                                  "diffusion": {"conditioning": "controlnet", "steps": 20, "scale_factor_batches": 2,
                                                "class_balance_max_weight": 10},
                                  "montage_cases": 2}))
    cli.train_synthesizer_entry(["-d", str(EXAMPLE_ID), "-f", "1", "-c", "2d", "--preset", str(config), "-device", "cpu"])
    folder = synthesizer_folder(EXAMPLE_NAME, "2d", 1)
    assert {"l1", "kl", "adv_g", "adv_d", "weighted_l1"} <= set(_losses(folder, "autoencoder"))  # discriminator trained
    assert {"mse", "weighted_mse"} <= set(_losses(folder, "diffusion"))
    # class weights from the fold's voxel shares, recorded with the weights: background 1, the rare ribs capped,
    # the largest foreground class (soft tissue) 1
    for stage in ("autoencoder", "diffusion"):
        weights = read_state(folder / f"{stage}.safetensors")["class_weights"]
        assert weights[0] == 1.0 and weights[1] == 10.0 and weights[5] == 1.0 and weights[-1] == 1.0
    tensors, _ = load_checkpoint(folder / "diffusion.safetensors")
    assert any(k.startswith("model.controlnet.") for k in tensors)
    cli.synthesize_entry(["-d", str(EXAMPLE_ID), "-f", "1", "-c", "2d", "-n", "2", "-o", "970", "--sampler", "unipc",
                          "--steps", "3", "-device", "cpu"])
    out = root / "raw" / "Dataset970_ChestCTSlabsSynthF1"
    _verify_integrity(out)
    assert read_provenance(out).generator["conditioning"] == "controlnet"
    assert read_provenance(out).training_cases == FoldData(EXAMPLE_ID, "2d", 1).training_cases
