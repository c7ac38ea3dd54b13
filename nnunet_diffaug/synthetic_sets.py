"""The synthetic dataset contract, one rule for the trainer, the evaluation and the judge filter alike:
which synthetic raw dataset belongs to fold F of a real dataset, and whether it may be used with it.

Every synthetic set carries ``diffaug_provenance.json`` (written by ``diffaug_synthesize``). The set of a
fold is the one in ``$nnUNet_raw`` whose provenance names the real dataset and the fold (judge
candidates excluded); a user names another explicitly (an environment variable for the trainer, a flag
for the commands). It may be used only if it was made from this dataset and fold, declares the same
channels, labels and file ending, and its generator never saw a validation case of the fold.
"""
from __future__ import annotations

from pathlib import Path

from nnunet_diffaug import paths
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.rawdata import (SyntheticProvenance, check_no_validation_leak, check_synthetic_matches_real,
                                    find_synthetic_datasets, read_provenance)


def locate_synthetic_set(dataset_name: str, fold, choice: str | None, how_to_choose: str, how_to_make: str) -> Path:
    """The set named by ``choice`` (dataset name, id or folder), else the only one made for this fold.

    ``how_to_choose``: how the caller's user names a set, ``"--synthetic "`` or ``"DIFFAUG_SYNTHETIC_DATASET="``;
    ``how_to_make``: what to run when there is none.
    """
    raw = paths.nnunet_raw()
    if choice:
        if Path(choice).is_dir():
            return Path(choice)
        try:
            folder = raw / paths.resolve_dataset_name(choice)
        except DiffAugError:
            folder = None
        if folder is None or not folder.is_dir():
            raise DiffAugError(f"{how_to_choose}{choice!r} is neither a folder nor a dataset in {raw}.")
        return folder
    found = find_synthetic_datasets(raw, dataset_name, fold)
    if not found:
        raise DiffAugError(f"No synthetic dataset for {dataset_name} fold {fold} in {raw} (none has a provenance "
                           f"naming them). {how_to_make}")
    if len(found) > 1:
        raise DiffAugError(f"Several synthetic datasets for {dataset_name} fold {fold} in {raw}: "
                           f"{', '.join(p.name for p in found)}. Choose one with {how_to_choose}<name, id or folder>.")
    return found[0]


def check_synthetic_set(folder: Path, real_dataset_json: dict, dataset_name: str, fold,
                        validation_cases: list[str], how_to_make: str = "") -> SyntheticProvenance:
    """Refuses a set made from another dataset or fold, declaring other channels/labels/file ending, or whose
    generator saw a validation case of the fold. Returns its provenance."""
    provenance = read_provenance(folder)
    if provenance.source_dataset != dataset_name:
        raise DiffAugError(f"{folder}: made from {provenance.source_dataset}, not {dataset_name}.")
    if str(provenance.fold) != str(fold):
        raise DiffAugError(f"{folder}: made for fold {provenance.fold}, not fold {fold}. Each fold needs its own "
                           f"synthesizer, or that fold's validation cases leak. {how_to_make}".rstrip())
    check_synthetic_matches_real(real_dataset_json, folder)
    if str(fold) != "all":  # fold 'all' validates on its training cases anyway
        check_no_validation_leak(provenance, validation_cases, folder)
    return provenance
