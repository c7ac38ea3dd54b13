"""Which synthetic raw dataset feeds fold F of dataset XXX, and whether it may.

Convention: ``diffaug_synthesize`` writes ``diffaug_provenance.json`` into every synthetic dataset
it makes; the trainer picks the one in ``$nnUNet_raw`` whose provenance names this dataset and fold.
``DIFFAUG_SYNTHETIC_DATASET`` (a dataset name, id or folder) selects one explicitly.
"""
from __future__ import annotations

import os
from pathlib import Path

from nnunet_diffaug import paths
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.rawdata import (check_no_validation_leak, check_synthetic_matches_real, find_synthetic_datasets,
                                    image_dimension, list_cases, read_provenance)

SYNTHETIC_DATASET_ENV = "DIFFAUG_SYNTHETIC_DATASET"


def _how_to_make(dataset_name: str, fold, configuration: str) -> str:
    return (f"Make one with:\n  diffaug_train_synthesizer -d {dataset_name} -f {fold} -c {configuration}\n"
            f"  diffaug_synthesize -d {dataset_name} -f {fold} -c {configuration} -n 50\n"
            "or train without synthetic data (nnUNetTrainerDiffAug_r0, or DIFFAUG_SYNTHETIC_RATIO=0).")


def _explicit_choice(value: str) -> Path:
    candidate = Path(value)
    if candidate.is_dir():
        return candidate
    raw = paths.nnunet_raw()
    try:
        return raw / paths.resolve_dataset_name(value)
    except DiffAugError:
        raise DiffAugError(f"{SYNTHETIC_DATASET_ENV}={value!r} is neither a folder nor a dataset in {raw}.") from None


def locate_synthetic_dataset(real_dataset_name: str, fold, configuration: str) -> Path:
    """The synthetic raw dataset for this fold; refuses with what to run when there is none or several."""
    chosen = os.environ.get(SYNTHETIC_DATASET_ENV)
    if chosen:
        return _explicit_choice(chosen)
    raw = paths.nnunet_raw()
    found = find_synthetic_datasets(raw, real_dataset_name, fold)
    if not found:
        raise DiffAugError(f"No synthetic dataset for {real_dataset_name} fold {fold} in {raw}. "
                           + _how_to_make(real_dataset_name, fold, configuration))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DiffAugError(f"Several synthetic datasets for {real_dataset_name} fold {fold} in {raw}: {names}. "
                           f"Choose one with {SYNTHETIC_DATASET_ENV}=<name or id>.")
    return found[0]


def validate_synthetic_dataset(folder: Path, real_dataset_json: dict, real_dataset_name: str, fold,
                               configuration: str, validation_cases: list[str], is_3d: bool) -> list[str]:
    """Checks a synthetic set against the real dataset and fold; returns its complete case ids."""
    provenance = read_provenance(folder)
    if provenance.source_dataset != real_dataset_name:
        raise DiffAugError(f"{folder}: made from {provenance.source_dataset}, not {real_dataset_name}.")
    if str(provenance.fold) != str(fold):
        raise DiffAugError(f"{folder}: made for fold {provenance.fold}, but this training runs fold {fold}. "
                           f"Each fold needs its own synthesizer, or validation cases leak. "
                           + _how_to_make(real_dataset_name, fold, configuration))
    check_synthetic_matches_real(real_dataset_json, folder)
    if str(fold) != "all":  # fold 'all' validates on its training cases anyway
        check_no_validation_leak(provenance, validation_cases, folder)
    if is_3d and provenance.configuration == "2d":
        raise DiffAugError(f"{folder}: made by a 2d synthesizer (single slices); it cannot feed 3D training "
                           f"({configuration}). Synthesize with a 3d_fullres synthesizer.")
    cases = list_cases(folder, {**real_dataset_json, "file_ending": real_dataset_json["file_ending"]})
    if not cases:
        raise DiffAugError(f"{folder} holds no complete synthetic case. " + _how_to_make(real_dataset_name, fold,
                                                                                         configuration))
    return sorted(cases)


def real_image_dimension(real_dataset_name: str) -> int | None:
    """Dimension of the real raw images (2 for PNG-style 2D datasets, 3 for volumes); None if the raw
    dataset is not on this machine (nnU-Net trains from preprocessed data alone)."""
    try:
        folder = paths.nnunet_raw() / real_dataset_name
        first = next(iter(list_cases(folder).values()), None)
    except DiffAugError:
        return None
    return image_dimension(first["images"][0]) if first else None
