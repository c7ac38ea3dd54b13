"""Which synthetic raw dataset feeds fold F of dataset XXX, and whether it may.

Convention: ``diffaug_synthesize`` writes ``diffaug_provenance.json`` into every synthetic dataset
it makes; the trainer picks the one in ``$nnUNet_raw`` whose provenance names this dataset and fold.
``DIFFAUG_SYNTHETIC_DATASET`` (a dataset name, id or folder) selects one explicitly.
"""
from __future__ import annotations

import os
from pathlib import Path

from nnunet_diffaug import paths
from nnunet_diffaug.env_vars import SYNTHETIC_DATASET
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.raw_dataset import image_dimension, list_cases
from nnunet_diffaug.synthetic_sets import check_synthetic_set, locate_synthetic_set



def _how_to_make(dataset_name: str, fold, configuration: str) -> str:
    return (f"Make one with:\n  diffaug_train_synthesizer -d {dataset_name} -f {fold} -c {configuration}\n"
            f"  diffaug_synthesize -d {dataset_name} -f {fold} -c {configuration} -n 50\n"
            "or train without synthetic data (nnUNetTrainerDiffAug_r0, or DIFFAUG_SYNTHETIC_RATIO=0).")


def locate_synthetic_dataset(real_dataset_name: str, fold, configuration: str) -> Path:
    """The synthetic raw dataset for this fold; refuses with what to run when there is none or several."""
    return locate_synthetic_set(real_dataset_name, fold, os.environ.get(SYNTHETIC_DATASET),
                                f"{SYNTHETIC_DATASET}=", _how_to_make(real_dataset_name, fold, configuration))


def validate_synthetic_dataset(folder: Path, real_dataset_json: dict, real_dataset_name: str, fold,
                               configuration: str, validation_cases: list[str], is_3d: bool,
                               plans: dict | None = None) -> list[str]:
    """Checks a synthetic set against the real dataset and fold; returns its complete case ids. ``plans``: the
    real dataset's, to compare what the set's synthesizer saw with the validation cases by content."""
    how_to_make = _how_to_make(real_dataset_name, fold, configuration)
    provenance = check_synthetic_set(folder, real_dataset_json, real_dataset_name, fold, validation_cases,
                                     how_to_make, plans)
    if is_3d and provenance.configuration == "2d":
        raise DiffAugError(f"{folder}: made by a 2d synthesizer (single slices); it cannot feed 3D training "
                           f"({configuration}). Synthesize with a 3d_fullres synthesizer.")
    cases = list_cases(folder, real_dataset_json)
    if not cases:
        raise DiffAugError(f"{folder} holds no complete synthetic case. " + how_to_make)
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
