"""Where things live: nnU-Net's three folders, and our additions inside them.

Everything we write goes into nnU-Net's own folders (or a path the user names):

- synthetic raw datasets:      $nnUNet_raw/DatasetYYY_<Source>SynthF<fold>/
- synthetic preprocessed data: $nnUNet_preprocessed/DatasetXXX_<Source>/diffaug_synthetic/<DatasetYYY>/<data_identifier>/
  (beside the real preprocessed data, never inside nnU-Net's data folder)
- synthesizer checkpoints:     $nnUNet_results/DatasetXXX_<Source>/diffaug_synthesizer__<config>/fold_<F>/
"""
from __future__ import annotations

import os
from pathlib import Path

from nnunet_diffaug.errors import DiffAugError

_HOW_TO_SET = ("Set nnU-Net's environment variables first, e.g. export nnUNet_raw=/data/nnUNet_raw "
               "nnUNet_preprocessed=/data/nnUNet_preprocessed nnUNet_results=/data/nnUNet_results "
               "(see nnU-Net's documentation/setting_up_paths.md).")


def _env_folder(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        raise DiffAugError(f"{name} is not set. {_HOW_TO_SET}")
    return Path(value)


def nnunet_raw() -> Path:
    return _env_folder("nnUNet_raw")


def nnunet_preprocessed() -> Path:
    return _env_folder("nnUNet_preprocessed")


def nnunet_results() -> Path:
    return _env_folder("nnUNet_results")


def trainer_shim_folder() -> Path:
    """The folder nnUNet_extTrainer must point at: it holds only a thin shim module."""
    return Path(__file__).resolve().parent / "nnunet_ext"


def synthetic_preprocessed_folder(real_dataset_name: str, synthetic_dataset_name: str,
                                  data_identifier: str) -> Path:
    return nnunet_preprocessed() / real_dataset_name / "diffaug_synthetic" / synthetic_dataset_name / data_identifier


def synthesizer_folder(real_dataset_name: str, configuration: str, fold: int) -> Path:
    return nnunet_results() / real_dataset_name / f"diffaug_synthesizer__{configuration}" / f"fold_{fold}"


def resolve_dataset_name(dataset_name_or_id: str | int) -> str:
    """'4', 4, 'Dataset004_Hippocampus' -> 'Dataset004_Hippocampus', with our error on failure."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(dataset_name_or_id)
    except RuntimeError as e:
        raise DiffAugError(f"Unknown dataset {dataset_name_or_id!r}: not found in nnUNet_raw, "
                           f"nnUNet_preprocessed or nnUNet_results. ({e})") from None


def console_script(name: str) -> str:
    """Path of an installed console script beside this interpreter (inside a venv too), else its bare name."""
    import sys
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name
