"""Helpers shared by the tests: nnU-Net environments, subprocess runs, stand-in synthetic datasets."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_diffaug.paths import console_script, trainer_shim_folder  # noqa: F401  (tests import console_script from here)
from nnunet_diffaug.provenance import SyntheticProvenance
from nnunet_diffaug.raw_dataset import list_cases, load_dataset_json
from nnunet_diffaug.synthetic_writer import SyntheticDatasetWriter

EXAMPLE_ID = 990
EXAMPLE_NAME = "Dataset990_ChestCTSlabs"
SMALL_PLANS = "nnUNetPlansDiffAugSmall"  # written by the planned_example fixture


def nnunet_env(root: Path, **extra) -> dict:
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_extTrainer": str(trainer_shim_folder()),
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": "1",
        # nnU-Net's export/evaluation pools default to 8 processes: on 2 cores their start-up dominates
        "nnUNet_def_n_proc": "1",
        "MPLBACKEND": "Agg",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


_NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@contextlib.contextmanager
def nnunet_folders(root: Path):
    """Points this process's nnU-Net folder variables at root/{raw,preprocessed,results}, then restores them."""
    env = nnunet_env(root)
    old = {k: os.environ.get(k) for k in _NNUNET_FOLDERS}
    os.environ.update({k: env[k] for k in _NNUNET_FOLDERS})
    try:
        yield root
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


# the real-trained nnU-Net of the ``judged_example`` fixture: trainer, plans, configuration
JUDGE = ("nnUNetTrainerBudget", SMALL_PLANS, "3d_fullres")


def private_copy_of_example(source_root: Path, destination: Path, with_results: bool = False) -> Path:
    """A copy of the planned example's raw and preprocessed data that a test may change; its results folder is
    empty, or with ``with_results`` a copy of the source's trained models."""
    for sub in ("raw", "preprocessed") + (("results",) if with_results else ()):
        shutil.copytree(source_root / sub / EXAMPLE_NAME, destination / sub / EXAMPLE_NAME)
    (destination / "results").mkdir(exist_ok=True)
    return destination


def set_nnunet_env(monkeypatch, root: Path) -> None:
    for k, v in nnunet_env(root).items():
        if k.startswith("nnUNet_"):
            monkeypatch.setenv(k, v)


def in_process_trainer(root: Path, trainer_name: str, fold: int, monkeypatch, configuration: str = "3d_fullres",
                       **env):
    """One of this package's trainers, built in this process on the planned example's small plans, with a tiny
    budget (2 epochs x 3 iterations, no worker processes) and the environment overrides given."""
    import torch
    from nnunet_diffaug.trainers import nnUNetTrainerDiffAug as module
    set_nnunet_env(monkeypatch, root)
    for key, value in {"nnUNet_n_proc_DA": 0, "DIFFAUG_NUM_EPOCHS": 2, "DIFFAUG_ITERATIONS_PER_EPOCH": 3,
                       "DIFFAUG_VAL_ITERATIONS": 1, "DIFFAUG_SEED": 0, **env}.items():
        monkeypatch.setenv(key, str(value))
    pre = root / "preprocessed" / EXAMPLE_NAME
    plans = json.loads((pre / f"{SMALL_PLANS}.json").read_text())
    plans["continue_training"] = False  # nnUNetv2_train sets it from its --c flag
    dataset_json = json.loads((pre / "dataset.json").read_text())
    return getattr(module, trainer_name)(plans, configuration, fold, dataset_json, torch.device("cpu"))


def run(cmd: list[str], env: dict, timeout: int = 900, expect_ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def train_tiny_judge(root: Path, configuration: str) -> None:
    """A tiny nnU-Net (``JUDGE``'s trainer and plans, 4 epochs x 40 iterations) trained on the real training cases
    of fold 0 of the example copied into ``root``, with nnU-Net's own console script."""
    trainer, plans, _ = JUDGE
    budget = {"DIFFAUG_NUM_EPOCHS": 4, "DIFFAUG_ITERATIONS_PER_EPOCH": 40, "DIFFAUG_VAL_ITERATIONS": 1,
              "DIFFAUG_SEED": 0, "nnUNet_n_proc_DA": 0}
    run([console_script("nnUNetv2_train"), EXAMPLE_NAME, configuration, "0", "-tr", trainer, "-p", plans,
         "-device", "cpu"], nnunet_env(root, **budget))




def write_raw_dataset(folder: Path, cases: dict, channel: str, labels: dict[str, int]) -> Path:
    """A one-channel nnU-Net raw dataset from arrays: ``cases`` maps case id -> (image, label, spacing), arrays in
    (z, y, x) order, spacing in SimpleITK's (x, y, z) order."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case_id, (image, label, spacing) in cases.items():
        for array, path in ((image, folder / "imagesTr" / f"{case_id}_0000.nii.gz"),
                            (label, folder / "labelsTr" / f"{case_id}.nii.gz")):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing(spacing)
            sitk.WriteImage(itk, str(path))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": channel}, "labels": labels,
                                                     "numTraining": len(cases), "file_ending": ".nii.gz"}))
    return folder


def write_splits(preprocessed_dataset_folder: Path, case_ids: list[str], n_folds: int = 2) -> list[dict]:
    """Deterministic k-fold splits (nnU-Net needs >= 5 cases for its own automatic split)."""
    ids = sorted(case_ids)
    splits = [{"train": [c for i, c in enumerate(ids) if i % n_folds != f],
               "val": [c for i, c in enumerate(ids) if i % n_folds == f]} for f in range(n_folds)]
    (preprocessed_dataset_folder / "splits_final.json").write_text(json.dumps(splits, indent=2))
    return splits


def _deform(image: sitk.Image, label: sitk.Image, rng: np.random.Generator):
    """A random small affine warp plus an intensity change: a cheap stand-in for a generative model."""
    transform = sitk.AffineTransform(3)
    size = np.array(image.GetSize())
    center = image.TransformContinuousIndexToPhysicalPoint((size - 1) / 2.0)
    transform.SetCenter(center)
    matrix = np.eye(3)
    angle = rng.uniform(-0.15, 0.15)
    matrix[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    matrix[:2, :2] *= rng.uniform(0.9, 1.1)
    transform.SetMatrix(matrix.ravel().tolist())
    warped_image = sitk.Resample(image, image, transform, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    warped_label = sitk.Resample(label, label, transform, sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    arr = sitk.GetArrayFromImage(warped_image)
    arr = arr * rng.uniform(0.95, 1.05) + rng.normal(0, 10, size=arr.shape)
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(image)
    return out, warped_label


def make_stand_in_synthetic_set(raw_root: Path, real_dataset_name: str, fold, training_cases: list[str],
                                n_cases: int, dataset_id: int = 901, seed: int = 0,
                                provenance_training_cases: list[str] | None = None, aligned: bool = False) -> Path:
    """Writes deformed copies of real training cases as a synthetic raw dataset with provenance.

    ``aligned``: no spatial change (only intensities), recorded as aligned variants of their source case.
    """
    real_folder = raw_root / real_dataset_name
    real_json = load_dataset_json(real_folder)
    real_cases = list_cases(real_folder, real_json)
    folder = raw_root / f"Dataset{dataset_id:03d}_StandInSynthF{fold}"
    provenance = SyntheticProvenance(
        source_dataset=real_dataset_name, fold=fold, configuration="3d_fullres",
        training_cases=list(provenance_training_cases if provenance_training_cases is not None else training_cases),
        generator={"kind": "test-stand-in: random affine warp of real training cases"}, seed=seed)
    writer = SyntheticDatasetWriter(folder, real_json, provenance)
    rng = np.random.default_rng(seed)
    for i in range(n_cases):
        source = training_cases[i % len(training_cases)]
        image = sitk.ReadImage(real_cases[source]["images"][0])
        label = sitk.ReadImage(real_cases[source]["label"])
        if aligned:
            arr = sitk.GetArrayFromImage(image).astype(np.float32)
            warped_image = sitk.GetImageFromArray(arr * rng.uniform(0.9, 1.1) + rng.normal(0, 20, size=arr.shape))
            warped_image.CopyInformation(image)
            warped_label = label
        else:
            warped_image, warped_label = _deform(image, label, rng)
        writer.write_case(f"synth_{i:05d}", [warped_image], warped_label,
                          {"source_case": source, "aligned_with_source": aligned})
    writer.finalize()
    return folder


def trainer_accepts(folder: Path, configuration: str, root: Path) -> list[str]:
    """What nnUNetTrainerDiffAug does with a synthetic set of the example's fold 0 before training: validate it
    against the real dataset and fold, then preprocess it with the real plans. Returns its case ids."""
    from nnunet_diffaug.trainers.preprocess import preprocess_synthetic_cases
    from nnunet_diffaug.trainers.synthetic_source import real_image_dimension, validate_synthetic_dataset
    real_json = load_dataset_json(root / "raw" / EXAMPLE_NAME)
    pre = root / "preprocessed" / EXAMPLE_NAME
    splits = json.loads((pre / "splits_final.json").read_text())
    cases = validate_synthetic_dataset(folder, real_json, EXAMPLE_NAME, 0, configuration, splits[0]["val"],
                                       is_3d=configuration != "2d")
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    done = preprocess_synthetic_cases(folder, real_json, plans, configuration, root / "tmp_pre" / folder.name,
                                      verbose=False, expected_dimension=real_image_dimension(EXAMPLE_NAME))
    assert done == cases
    return cases


def toy_benchmark_dataset(root: Path, monkeypatch, duplicate: tuple[str, str] | None = None) -> str:
    """A benchmark's user dataset: 8 one-channel cases of random noise (real NIfTI files: the benchmark hashes their content); ``duplicate``:
    (case, twin) gets twin's image under its own name."""
    dataset = "Dataset501_ToyPool"
    raw = root / "user_raw" / dataset
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {f"toy_{i:03d}": rng.normal(size=(4, 8, 8)).astype(np.float32) for i in range(8)}
    if duplicate:
        images[duplicate[0]] = images[duplicate[1]]
    for case, array in images.items():
        sitk.WriteImage(sitk.GetImageFromArray(array), str(raw / "imagesTr" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray((array > 0).astype(np.uint8)), str(raw / "labelsTr" / f"{case}.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
                                                  "numTraining": 8, "file_ending": ".nii.gz"}))
    pre = root / "user_preprocessed" / dataset
    pre.mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text("{}")
    monkeypatch.setenv("nnUNet_raw", str(root / "user_raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "user_preprocessed"))
    return dataset


class RecordingRunner:
    """Records the commands; 'trains' an arm by writing its summary.json."""

    def __init__(self):
        self.calls = []

    def __call__(self, cmd, env):
        self.calls.append((Path(cmd[0]).name, cmd, env))
        if Path(cmd[0]).name == "nnUNetv2_train":
            trainer, plans = cmd[cmd.index("-tr") + 1], cmd[cmd.index("-p") + 1]
            fold_dir = Path(env["nnUNet_results"]) / cmd[1] / f"{trainer}__{plans}__{cmd[2]}" / f"fold_{cmd[3]}"
            (fold_dir / "validation").mkdir(parents=True)
            (fold_dir / "validation" / "summary.json").write_text(json.dumps(
                {"mean": {"1": {"Dice": 0.5}}, "foreground_mean": {"Dice": 0.5}}))


# Ways to spoil a trained judge's folder (fold 0), shared by the tests of every place that checks judges
def judge_validated_on_another_split(folder: Path, splits: list[dict]) -> None:
    """Its validation summary names a training case of fold 0: it was trained on another fold or split."""
    summary = folder / "fold_0" / "validation" / "summary.json"
    s = json.loads(summary.read_text())
    for case in s["metric_per_case"]:
        case["reference_file"] = case["reference_file"].replace(splits[0]["val"][0], splits[0]["train"][0])
    summary.write_text(json.dumps(s))


def judge_trained_with_synthetic_cases(folder: Path) -> None:
    debug = folder / "fold_0" / "debug.json"
    debug.write_text(json.dumps({**json.loads(debug.read_text()), "synthetic_dataset_folder": "/x/Dataset950_S"}))
