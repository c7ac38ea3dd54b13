"""What one evaluation looks at: the real dataset and fold, the synthetic set, the trained nnU-Net model.

Everything is resolved and checked here, before any prediction starts, so that bad input is refused
with one message naming the file and the problem.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_diffaug import paths, raw_dataset
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import read_json
from nnunet_diffaug.provenance import PROVENANCE_FILE, SyntheticProvenance
from nnunet_diffaug.raw_dataset import list_cases, load_dataset_json
from nnunet_diffaug.synthetic_sets import check_synthetic_matches_real, check_synthetic_set, locate_synthetic_set


@dataclass
class EvaluationInputs:
    dataset_name: str
    fold: int
    real_folder: Path
    real_json: dict
    real_cases: dict                 # case id -> {'images': [...], 'label': ...} (all real cases)
    training_cases: list[str]        # fold F training cases (what the synthesizer and the model saw)
    validation_cases: list[str]      # fold F validation cases (seen by neither)
    synthetic_folder: Path
    synthetic_cases: dict            # case id -> {'images': [...], 'label': ...}
    provenance: SyntheticProvenance | None
    model_folder: Path
    checkpoint: str
    notes: list[str] = field(default_factory=list)

    @property
    def checkpoint_file(self) -> Path:
        return self.model_folder / f"fold_{self.fold}" / self.checkpoint


def read_fold(dataset_name: str, fold: int) -> tuple[list[str], list[str]]:
    """(training, validation) case ids of ``fold`` from nnU-Net's splits_final.json; both must be non-empty."""
    train, val = raw_dataset.read_fold(paths.nnunet_preprocessed() / dataset_name, fold)
    if not val:
        raise DiffAugError(f"splits_final.json of {dataset_name}: fold {fold} has no validation cases, and they are "
                           f"the held-out real reference of every metric.")
    return train, val


def locate_synthetic(dataset_name: str, fold: int, choice: str | None) -> Path:
    """The synthetic set named by ``choice`` (name, id or folder), else the only one made for this fold."""
    return locate_synthetic_set(dataset_name, fold, choice, "--synthetic ",
                                f"Make one with diffaug_synthesize -d {dataset_name} -f {fold} -n 50, or name a "
                                f"folder with --synthetic.")


def model_folder_from_names(dataset_name: str, trainer: str, plans: str, configuration: str) -> Path:
    return paths.nnunet_results() / dataset_name / f"{trainer}__{plans}__{configuration}"


def check_model_folder(folder: Path, dataset_name: str, fold: int, checkpoint: str, real_json: dict,
                       how_to_train: str = "nnUNetv2_train") -> None:
    """Refuses a model folder that lacks the fold's checkpoint or was trained on other labels."""
    if not folder.is_dir():
        raise DiffAugError(f"Model folder {folder} does not exist. Train the model first ({how_to_train}) "
                           f"or pass --model <folder>.")
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise DiffAugError(f"{folder / name} does not exist: {folder} is not an nnU-Net model folder.")
    ckpt = folder / f"fold_{fold}" / checkpoint
    if not ckpt.is_file():
        raise DiffAugError(f"{ckpt} does not exist: the model has no finished fold {fold} "
                           f"(train it with {how_to_train}, or choose another checkpoint with -chk).")
    plans = read_json(folder / "plans.json")
    if plans.get("dataset_name") not in (None, dataset_name):
        raise DiffAugError(f"{folder / 'plans.json'}: the model was trained on {plans['dataset_name']}, "
                           f"not {dataset_name}.")
    model_labels = read_json(folder / "dataset.json").get("labels")
    if model_labels != real_json["labels"]:
        raise DiffAugError(f"{folder / 'dataset.json'}: the model's labels {model_labels} differ from the real "
                           f"dataset's {real_json['labels']}.")


def evenly_spaced(items: list[str], max_items: int | None) -> list[str]:
    """At most ``max_items`` of ``items``, spread evenly over the sorted list (deterministic)."""
    items = sorted(items)
    if max_items is None or len(items) <= max_items:
        return items
    idx = np.unique(np.round(np.linspace(0, len(items) - 1, max_items)).astype(int))
    return [items[i] for i in idx]


def resolve_inputs(dataset: str | int, fold: int, synthetic: str | None = None, model_folder: str | None = None,
                   trainer: str = "nnUNetTrainer", plans: str = "nnUNetPlans", configuration: str = "3d_fullres",
                   checkpoint: str = "checkpoint_final.pth", max_cases: int | None = None) -> EvaluationInputs:
    dataset_name = paths.resolve_dataset_name(dataset)
    real_folder = paths.nnunet_raw() / dataset_name
    real_json = load_dataset_json(real_folder)
    real_cases = list_cases(real_folder, real_json)
    training, validation = read_fold(dataset_name, fold)
    missing = sorted(set(training + validation) - set(real_cases))
    if missing:
        raise DiffAugError(f"splits_final.json of {dataset_name} names case(s) without raw image and label in "
                           f"{real_folder}: {', '.join(missing[:5])}.")
    notes = []

    synth_folder = locate_synthetic(dataset_name, fold, synthetic)
    synth_json = check_synthetic_matches_real(real_json, synth_folder)  # also for sets without provenance
    provenance = None
    if (synth_folder / PROVENANCE_FILE).is_file():
        # the validation cases are the held-out reference of every metric: a synthesizer that saw them would
        # make the comparisons flatter the synthetic set
        plans_file = paths.nnunet_preprocessed() / dataset_name / f"{plans}.json"  # its reader, for content hashes
        provenance = check_synthetic_set(synth_folder, real_json, dataset_name, fold, validation,
                                         "Evaluate a set with -f of the fold it was made for: that fold's validation cases "
                                         "are the ones it never saw.",
                                         read_json(plans_file) if plans_file.is_file() else None)
    else:
        notes.append(f"{synth_folder} has no {PROVENANCE_FILE}: which real cases its generator saw is unknown, "
                     f"so the held-out status of the validation cases cannot be checked.")
    synth_cases = list_cases(synth_folder, synth_json)
    if not synth_cases:
        raise DiffAugError(f"{synth_folder} holds no complete case (image and label in imagesTr/labelsTr).")

    folder = Path(model_folder) if model_folder else model_folder_from_names(dataset_name, trainer, plans,
                                                                             configuration)
    how_to_train = "nnUNetv2_train" if model_folder else \
        f"nnUNetv2_train {dataset_name} {configuration} {fold} -tr {trainer} -p {plans}"
    check_model_folder(folder, dataset_name, fold, checkpoint, real_json, how_to_train)
    if provenance is not None and provenance.configuration == "2d" and "3d" in folder.name.split("__")[-1]:
        raise DiffAugError(f"{synth_folder} was made by a 2d synthesizer (single slices) but the model {folder} is "
                           f"3D; evaluate it with a 2d model (-c 2d).")

    chosen = evenly_spaced(list(synth_cases), max_cases)
    if len(chosen) < len(synth_cases):
        notes.append(f"--max-cases {max_cases}: {len(chosen)} of {len(synth_cases)} synthetic cases used "
                     f"(evenly spaced over the sorted case ids).")
    return EvaluationInputs(
        dataset_name=dataset_name, fold=fold, real_folder=real_folder, real_json=real_json, real_cases=real_cases,
        training_cases=evenly_spaced(training, max_cases), validation_cases=evenly_spaced(validation, max_cases),
        synthetic_folder=synth_folder, synthetic_cases={c: synth_cases[c] for c in chosen}, provenance=provenance,
        model_folder=folder, checkpoint=checkpoint, notes=notes)
