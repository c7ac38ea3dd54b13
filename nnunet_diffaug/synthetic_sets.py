"""The synthetic dataset contract, one rule for the trainer, the evaluation and the judge filter alike:
which synthetic raw dataset belongs to fold F of a real dataset, and whether it may be used with it.

Every synthetic set carries ``diffaug_provenance.json`` (written by ``diffaug_synthesize``). The set of a
fold is the one in ``$nnUNet_raw`` whose provenance names the real dataset and the fold (judge
candidates excluded); a user names another explicitly (an environment variable for the trainer, a flag
for the commands). It may be used only if it was made from this dataset and fold, declares the same
channels, labels and file ending, and its generator never saw a validation case of the fold: not as a
training case (the provenance), nor through what its ``diffaug_seen_data.json`` names (unlabelled images by
content hash, an init source's labelled cases), compared with the split as it is now. A new set
is named ``DatasetYYY_<Source>SynthF<fold>``, by default with the first id from 900 that nnU-Net's
folders do not use yet.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from nnunet_diffaug import paths
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.provenance import (CANDIDATES_ROLE, PROVENANCE_FILE, SEEN_DATA_FILE, SyntheticProvenance,
                                       read_provenance, read_seen_data)
from nnunet_diffaug.raw_dataset import load_dataset_json
from nnunet_diffaug.unlabeled import seen_validation_leak


def synthetic_dataset_name(dataset_id: int, source_dataset_name: str, fold: int) -> str:
    source_task = source_dataset_name.split("_", 1)[1] if "_" in source_dataset_name else source_dataset_name
    return f"Dataset{dataset_id:03d}_{source_task}SynthF{fold}"


def next_free_dataset_id(start: int = 900) -> int:
    """The smallest dataset id >= start not used in nnUNet_raw, nnUNet_preprocessed or nnUNet_results."""
    used = set()
    for root in (paths.nnunet_raw(), paths.nnunet_preprocessed(), paths.nnunet_results()):
        if root.is_dir():
            for name in os.listdir(root):
                m = re.match(r"^Dataset(\d{3})_", name)
                if m:
                    used.add(int(m.group(1)))
    for candidate in range(start, 1000):
        if candidate not in used:
            return candidate
    raise DiffAugError(f"No free nnU-Net dataset id between {start} and 999; pass one explicitly.")


def output_folder(dataset_name: str, fold: int, provenance: SyntheticProvenance, output_id: int | None,
                  num_parts: int = 1) -> Path:
    """Where a synthesis request writes: ``-o`` if given (refused if another dataset uses that id); else the
    set an identical earlier request made (a rerun continues it); else a new set with the next free id."""
    raw_root = paths.nnunet_raw()
    if output_id is not None:
        if not 1 <= output_id <= 999:
            raise DiffAugError(f"--output-dataset {output_id}: nnU-Net dataset ids are 1..999.")
        name = synthetic_dataset_name(output_id, dataset_name, fold)
        clash = [p.name for p in raw_root.glob(f"Dataset{output_id:03d}_*") if p.name != name] if raw_root.is_dir() else []
        if clash:
            raise DiffAugError(f"{raw_root / clash[0]} already uses dataset id {output_id}; choose another --output-dataset.")
        return raw_root / name
    for folder in find_synthetic_datasets(raw_root, dataset_name, fold, include_candidates=True):
        try:
            if read_provenance(folder).to_json() == provenance.to_json():
                return folder  # the same request as before: continue that dataset
        except DiffAugError:
            continue
    if num_parts > 1:
        raise DiffAugError("With -num_parts > 1 pass --output-dataset ID, so that all parts write the same dataset.")
    return raw_root / synthetic_dataset_name(next_free_dataset_id(), dataset_name, fold)


def find_synthetic_datasets(raw_root: str | os.PathLike, source_dataset_name: str, fold: int,
                            include_candidates: bool = False) -> list[Path]:
    """Synthetic raw datasets in ``raw_root`` made from ``source_dataset_name``'s fold ``fold``
    (without judge candidates unless ``include_candidates``)."""
    found = []
    raw_root = Path(raw_root)
    if not raw_root.is_dir():
        return found
    for name in sorted(os.listdir(raw_root)):
        prov_file = raw_root / name / PROVENANCE_FILE
        if not prov_file.is_file():
            continue
        try:
            prov = json.loads(prov_file.read_text())
        except json.JSONDecodeError:
            continue  # reported when the user selects it explicitly
        if prov.get("source_dataset") != source_dataset_name or prov.get("fold") != fold:
            continue
        if not include_candidates and isinstance(prov.get("generator"), dict) and \
                prov["generator"].get("role") == CANDIDATES_ROLE:
            continue
        found.append(raw_root / name)
    return found


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
                        validation_cases: list[str], how_to_make: str = "",
                        plans: dict | None = None) -> SyntheticProvenance:
    """Refuses a set made from another dataset or fold, declaring other channels/labels/file ending, or whose
    generator saw a validation case of the fold. Returns its provenance. ``plans``: the real dataset's (its image
    reader), to compare unlabelled images by content; None: only names are compared, and a note says so."""
    provenance = read_provenance(folder)
    if provenance.source_dataset != dataset_name:
        raise DiffAugError(f"{folder}: made from {provenance.source_dataset}, not {dataset_name}.")
    if str(provenance.fold) != str(fold):
        raise DiffAugError(f"{folder}: made for fold {provenance.fold}, not fold {fold}. Each fold needs its own "
                           f"synthesizer, or that fold's validation cases leak. {how_to_make}".rstrip())
    check_synthetic_matches_real(real_dataset_json, folder)
    if str(fold) != "all":  # fold 'all' validates on its training cases anyway
        check_no_validation_leak(provenance, validation_cases, folder)
        check_seen_data(folder, provenance, validation_cases, plans)
    return provenance


def check_synthetic_matches_real(real_dataset_json: dict, synthetic_folder: str | os.PathLike) -> dict:
    """Refuses a synthetic set whose channels, labels or file ending differ from the real dataset's."""
    synthetic_folder = Path(synthetic_folder)
    sj = load_dataset_json(synthetic_folder)
    where = synthetic_folder / "dataset.json"
    real_channels = {str(k): v for k, v in real_dataset_json["channel_names"].items()}
    synth_channels = {str(k): v for k, v in sj["channel_names"].items()}
    if real_channels != synth_channels:
        raise DiffAugError(f"{where}: channel_names {synth_channels} differ from the real dataset's {real_channels}.")
    if sj["labels"] != real_dataset_json["labels"]:
        raise DiffAugError(f"{where}: labels {sj['labels']} differ from the real dataset's {real_dataset_json['labels']}.")
    if sj["file_ending"] != real_dataset_json["file_ending"]:
        raise DiffAugError(f"{where}: file_ending {sj['file_ending']!r} differs from the real dataset's "
                           f"{real_dataset_json['file_ending']!r}.")
    return sj


def check_no_validation_leak(provenance: SyntheticProvenance, validation_cases: list[str],
                             synthetic_folder: str | os.PathLike) -> None:
    leaked = sorted(set(provenance.training_cases) & set(validation_cases))
    if leaked:
        raise DiffAugError(
            f"{Path(synthetic_folder) / PROVENANCE_FILE}: the synthesizer saw {len(leaked)} validation case(s) of "
            f"fold {provenance.fold} ({', '.join(leaked[:5])}{', ...' if len(leaked) > 5 else ''}). Training with it "
            f"would leak validation data. Train a synthesizer on this fold's training cases only "
            f"(diffaug_train_synthesizer -f {provenance.fold}) and synthesize again.")


# provenance ``generator`` entries of data from outside the fold's labelled cases (synthesis/outside_data.py)
_OUTSIDE_DATA = {"unlabeled": "unlabelled images", "init_from": "init source (--init-from)"}


def check_seen_data(synthetic_folder: str | os.PathLike, provenance: SyntheticProvenance,
                    validation_cases: list[str], plans: dict | None) -> None:
    """Refuses a set whose synthesizer's weights saw one of the fold's validation cases as they are now, through
    what the set's SEEN_DATA_FILE names (the split may have changed since the synthesizer was trained). Raw
    validation images are read only when that file names something to compare by content."""
    path = Path(synthetic_folder) / SEEN_DATA_FILE
    seen = read_seen_data(synthetic_folder)
    fold, dataset = provenance.fold, provenance.source_dataset
    if seen is None:
        used = [what for key, what in _OUTSIDE_DATA.items() if key in provenance.generator]
        if used:
            print(f"NOTE: {synthetic_folder}: its synthesizer's {' and '.join(used)} could not be re-checked against "
                  f"fold {fold}'s current validation cases: the set was made before sets recorded what their "
                  f"synthesizer saw ({SEEN_DATA_FILE}); synthesize again to have them checked.")
        return

    def uncompared(name: str | None) -> None:
        what = f"the labelled cases of {name}" if name else "its unlabelled images and other datasets' cases"
        where = f"$nnUNet_raw/{name} is absent or unreadable here" if name else "no plans to read images with"
        print(f"NOTE: {path}: {what} could not be compared by content with fold {fold}'s validation cases "
              f"({where}); only names were checked.")
    leak = seen_validation_leak(seen, dataset, validation_cases, plans, "validation case(s)",
                                f"of fold {fold} of {dataset}", f"{path} (what the synthesizer saw)", uncompared)
    if leak is not None:
        how = {"labelled": (" as labelled cases", "from an init source that never saw them"),
               "unlabelled": ("", "without those unlabelled images"),
               "copy": ("", "from an init source that never saw them")}[leak.kind]
        raise DiffAugError(
            f"{path}: the synthesizer that made this set has seen {leak.text}{how[0]}, so training with this set "
            f"would leak validation data (splits_final.json changed since it was trained?). Retrain the synthesizer "
            f"on this fold's split (diffaug_train_synthesizer -f {fold}, {how[1]}) and synthesize again.")
