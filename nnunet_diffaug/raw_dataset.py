"""Reading and validating nnU-Net raw datasets: dataset.json, the fold split, case files and their contents.

Errors name the file and the problem, so a bad dataset stops a run before nnU-Net or a synthesizer
chokes on it (or, worse, learns from it).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import atomic_write_json, read_json

_SAFE_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")


def validate_case_id(case_id: str, where: str = "") -> str:
    """Case identifiers become file names: refuse separators, '..' and other surprises."""
    if not isinstance(case_id, str) or not _SAFE_CASE_ID.match(case_id) or ".." in case_id:
        raise DiffAugError(f"Invalid case identifier {case_id!r}{' in ' + where if where else ''}: "
                           f"use letters, digits, '_', '-' and '.', no path separators and no '..'.")
    return case_id


def read_fold(preprocessed_dataset_folder: str | os.PathLike, fold: int) -> tuple[list[str], list[str]]:
    """(training, validation) case ids of ``fold``, sorted, from nnU-Net's splits_final.json."""
    path = Path(preprocessed_dataset_folder) / "splits_final.json"
    splits = read_json(path, "the fold's cases are unknown. Run nnUNetv2_train once (it writes the split) or write "
                             "splits_final.json yourself (a list of {'train': [...], 'val': [...]} per fold).")
    if not isinstance(splits, list) or not all(isinstance(s, dict) and "train" in s for s in splits):
        raise DiffAugError(f"{path}: expected a list of {{'train': [...], 'val': [...]}} objects.")
    if not 0 <= fold < len(splits):
        raise DiffAugError(f"{path} defines folds 0..{len(splits) - 1}; fold {fold} does not exist.")
    train, val = sorted(splits[fold]["train"]), sorted(splits[fold].get("val", []))
    if not train:
        raise DiffAugError(f"{path}: fold {fold} has no training cases.")
    return train, val


def ensure_default_split(preprocessed_dataset_folder: str | os.PathLike,
                         configuration_data_folder: str | os.PathLike) -> bool:
    """Writes nnU-Net's own default split when splits_final.json is missing: what ``nnUNetv2_train``
    writes on its first run (the preprocessed case identifiers, sorted, 5 folds, seed 12345), so a
    synthesizer trained before nnU-Net sees exactly the fold nnU-Net will later train and validate on.
    Returns whether it wrote one."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    path = Path(preprocessed_dataset_folder) / "splits_final.json"
    if path.is_file():
        return False
    case_ids = infer_dataset_class(str(configuration_data_folder)).get_identifiers(str(configuration_data_folder))
    if len(case_ids) < 5:
        raise DiffAugError(f"{path} does not exist and nnU-Net's default 5-fold split needs at least 5 cases "
                           f"({len(case_ids)} in {configuration_data_folder}): write splits_final.json yourself "
                           f"(a list of {{'train': [...], 'val': [...]}} per fold).")
    atomic_write_json(path, generate_crossval_split(sorted(case_ids), seed=12345, n_splits=5))
    return True


def load_dataset_json(dataset_folder: str | os.PathLike) -> dict:
    """Loads and checks dataset.json of a raw dataset, with an error naming the file and the problem."""
    path = Path(dataset_folder) / "dataset.json"
    dj = read_json(path, f"{dataset_folder} is not an nnU-Net raw dataset.")
    if not isinstance(dj, dict):
        raise DiffAugError(f"{path} must hold a JSON object, found {type(dj).__name__}.")
    channels = dj.get("channel_names", dj.get("modality"))
    missing = [k for k, v in (("channel_names", channels), ("labels", dj.get("labels")),
                              ("file_ending", dj.get("file_ending"))) if not v]
    if missing:
        raise DiffAugError(f"{path} lacks required key(s) {missing} (nnU-Net v2 format).")
    labels = dj["labels"]
    if not isinstance(labels, dict) or "background" not in labels:
        raise DiffAugError(f"{path}: 'labels' must map names to integer values and include 'background'.")
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise DiffAugError(f"{path}: region-based labels ({name!r}: {value}) are not supported by nnunet-diffaug.")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DiffAugError(f"{path}: label {name!r} has value {value!r}; labels must be non-negative integers.")
    if "channel_names" not in dj:
        dj["channel_names"] = dj["modality"]
    return dj


def label_values(dataset_json: dict) -> list[int]:
    """Declared label values, background first, without the ignore label."""
    return sorted(v for k, v in dataset_json["labels"].items() if k != "ignore")


def num_channels(dataset_json: dict) -> int:
    return len(dataset_json["channel_names"])


def image_file(dataset_folder: Path, case_id: str, channel: int, file_ending: str) -> Path:
    return Path(dataset_folder) / "imagesTr" / f"{case_id}_{channel:04d}{file_ending}"


def label_file(dataset_folder: Path, case_id: str, file_ending: str) -> Path:
    return Path(dataset_folder) / "labelsTr" / f"{case_id}{file_ending}"


def list_cases(dataset_folder: str | os.PathLike, dataset_json: dict | None = None,
               require_complete: bool = True) -> dict[str, dict]:
    """``{case_id: {'images': [paths per channel], 'label': path}}`` for the cases in imagesTr/labelsTr.

    With ``require_complete`` a case whose label or any channel is missing is skipped (a synthetic
    case mid-write); otherwise it is an error naming the missing file.
    """
    folder = Path(dataset_folder)
    dj = dataset_json or load_dataset_json(folder)
    ending = dj["file_ending"]
    labels_dir = folder / "labelsTr"
    if not labels_dir.is_dir():
        raise DiffAugError(f"{labels_dir} does not exist: {folder} has no training labels.")
    cases = {}
    for name in sorted(os.listdir(labels_dir)):
        if name.startswith(".") or not name.endswith(ending):
            continue
        case_id = name[: -len(ending)]
        validate_case_id(case_id, str(labels_dir / name))
        images = [image_file(folder, case_id, c, ending) for c in range(num_channels(dj))]
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            if require_complete:
                continue
            raise DiffAugError(f"Case {case_id} of {folder} is missing channel file(s): {missing}")
        cases[case_id] = {"images": [str(p) for p in images], "label": str(labels_dir / name)}
    return cases


def _read_image(path: str | os.PathLike):
    import SimpleITK as sitk
    if not Path(path).is_file():
        raise DiffAugError(f"{path} does not exist.")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise DiffAugError(f"{path} cannot be read as an image ({first_line}).") from None


def image_dimension(path: str | os.PathLike) -> int:
    """Spatial dimension of an image file, from its header only."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return _read_image(path).GetDimension()
    return reader.GetDimension()


def _same_geometry(a, b, tolerance: float = 1e-3) -> bool:
    import numpy as np
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tolerance, atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=tolerance, atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def check_case(case_id: str, images: list[str], label: str, dataset_json: dict,
               expected_dimension: int | None = None) -> None:
    """Refuses a case nnU-Net would choke on or learn garbage from, naming the file and the problem:
    unreadable files, multi-component pixels, wrong dimension, image/label geometry mismatch, NaN/Inf
    voxels, non-integer or undeclared label values, and label maps without any foreground."""
    import numpy as np
    import SimpleITK as sitk
    validate_case_id(case_id)
    label_img = _read_image(label)
    declared = set(dataset_json["labels"].values())
    for path in [*images, label]:
        img = label_img if path == label else _read_image(path)
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise DiffAugError(f"{path} has {img.GetNumberOfComponentsPerPixel()} components per voxel; nnU-Net "
                               f"expects one file per channel (_0000, _0001, ...).")
        if expected_dimension is not None and img.GetDimension() != expected_dimension:
            raise DiffAugError(f"{path} is {img.GetDimension()}D, but the dataset's cases are {expected_dimension}D.")
        if path != label:
            if not _same_geometry(img, label_img):
                raise DiffAugError(
                    f"{path} and its label {label} differ in geometry (size {img.GetSize()} vs {label_img.GetSize()}, "
                    f"spacing {tuple(round(x, 4) for x in img.GetSpacing())} vs "
                    f"{tuple(round(x, 4) for x in label_img.GetSpacing())}, or origin/direction).")
            if not np.isfinite(sitk.GetArrayViewFromImage(img)).all():
                raise DiffAugError(f"{path} holds NaN or Inf voxels.")
    values = sitk.GetArrayViewFromImage(label_img)
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all() or np.any(values != np.round(values)):
            raise DiffAugError(f"{label} holds non-integer label values; labels must be whole numbers.")
    present = set(np.unique(values).astype(np.int64).tolist())
    undeclared = sorted(present - declared)
    if undeclared:
        raise DiffAugError(f"{label} holds label value(s) {undeclared} that dataset.json does not declare "
                           f"(declared: {sorted(declared)}).")
    if present <= {0, dataset_json["labels"].get("ignore", 0)}:
        raise DiffAugError(f"{label} is empty: it holds no foreground label.")
