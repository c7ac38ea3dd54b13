"""The provenance of a synthetic raw dataset: where the set came from, and the files that record it.

``diffaug_provenance.json`` (one per set) names the source dataset, the fold, every real case the
generator saw, the generator and the seed; ``diffaug_cases/<case>.json`` (one per case) says where that
case came from (label source, seed, ...). ``diffaug_seen_data.json``, only in sets whose synthesizer saw more
than the fold's labelled cases (unlabelled images, an init source's cases), is a copy of its seen data:
labelled cases per dataset, content hashes of the unlabelled images, label names. Which set belongs to a fold, and whether it may be used, is
decided from these records by :mod:`nnunet_diffaug.synthetic_sets`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import read_json

PROVENANCE_FILE = "diffaug_provenance.json"
SEEN_DATA_FILE = "diffaug_seen_data.json"
CASE_RECORDS_DIR = "diffaug_cases"
PROVENANCE_FORMAT = 1

# Provenance ``generator.role`` of a set that is not meant for training: the candidates a judge filters
# (``diffaug_synthesize --judge``). Finding "the synthetic set of a fold" skips them; naming one still works.
CANDIDATES_ROLE = "judge-candidates"


@dataclasses.dataclass
class SyntheticProvenance:
    """Where a synthetic dataset came from. The trainer refuses sets whose synthesizer saw validation cases."""
    source_dataset: str                  # e.g. Dataset004_Hippocampus
    fold: int                            # the fold whose TRAINING cases the synthesizer saw
    configuration: str                   # nnU-Net configuration the synthesizer was trained in
    training_cases: list[str]            # every real case the synthesizer (or the label source) saw
    generator: dict                      # model kind, checkpoint hash, sampler, steps, label mode, ...
    seed: int
    format_version: int = PROVENANCE_FORMAT

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict, where: str = "") -> "SyntheticProvenance":
        fields = {f.name for f in dataclasses.fields(cls)}
        required = fields - {"format_version"}
        missing = sorted(required - set(obj))
        if missing:
            raise DiffAugError(f"{where or 'provenance'} lacks required field(s) {missing}.")
        if not isinstance(obj["training_cases"], list):
            raise DiffAugError(f"{where or 'provenance'}: 'training_cases' must be a list of case identifiers.")
        return cls(**{k: v for k, v in obj.items() if k in fields})


def read_provenance(synthetic_folder: str | os.PathLike) -> SyntheticProvenance:
    path = Path(synthetic_folder) / PROVENANCE_FILE
    obj = read_json(path, f"{synthetic_folder} was not written by diffaug_synthesize (or lost its provenance), "
                          f"so it cannot be checked against the fold's validation cases.")
    if not isinstance(obj, dict):
        raise DiffAugError(f"{path} must hold a JSON object.")
    return SyntheticProvenance.from_json(obj, str(path))


def read_seen_data(synthetic_folder: str | os.PathLike) -> dict | None:
    """A set's SEEN_DATA_FILE (None where it has none: its synthesizer saw the fold's labelled cases only, or the
    set is older than the file)."""
    path = Path(synthetic_folder) / SEEN_DATA_FILE
    if not path.is_file():
        return None
    obj = read_json(path)
    if not (isinstance(obj, dict) and isinstance(obj.get("labelled_cases"), dict)
            and isinstance(obj.get("unlabeled_content_sha256"), list)):
        raise DiffAugError(f"{path} must hold an object with 'labelled_cases' (dataset -> case ids) and "
                           f"'unlabeled_content_sha256' (a list); synthesize the set again to rewrite it.")
    return obj
