"""Writing a synthetic raw dataset, one complete case at a time, safely from several processes at once.

On-disk layout (a valid nnU-Net raw dataset plus our records)::

    DatasetYYY_<Source>SynthF<fold>/
        dataset.json                 labels, channel_names and file_ending copied from the real dataset
        imagesTr/<case>_0000<ending> ...
        labelsTr/<case><ending>      written LAST: a case is complete iff its label exists
        diffaug_provenance.json      source dataset, fold, training cases, generator, seed
        diffaug_cases/<case>.json    where each case came from (label source, seed, ...)
        diffaug_seen_data.json       only when the synthesizer saw more than the fold's labelled cases

Every file is written atomically (temporary sibling, then ``os.replace``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import (atomic_write_image, atomic_write_json, folder_lock, is_lock_file,
                                    remove_stale_temporaries, temporary_name)
from nnunet_diffaug.provenance import (CASE_RECORDS_DIR, PROVENANCE_FILE, SEEN_DATA_FILE, SyntheticProvenance,
                                       read_provenance)
from nnunet_diffaug.raw_dataset import image_file, label_file, list_cases, num_channels, validate_case_id


class SyntheticDatasetWriter:
    """Writes synthetic cases into a raw dataset folder, one complete case at a time.

    Safe to use from several processes on the same folder (``-num_parts/-part_id``): each case is
    written atomically with its label last, and dataset.json is updated under a lock. ``seen_data``: what the
    synthesizer saw beyond the fold's labelled cases (SEEN_DATA_FILE), None when nothing.
    """

    def __init__(self, folder: str | os.PathLike, real_dataset_json: dict, provenance: SyntheticProvenance,
                 overwrite: bool = False, seen_data: dict | None = None):
        self.folder = Path(folder)
        self.real_dataset_json = real_dataset_json
        self.provenance = provenance
        self.seen_data = seen_data
        self.file_ending = real_dataset_json["file_ending"]
        with folder_lock(self.folder):
            self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        prov_path = self.folder / PROVENANCE_FILE
        if prov_path.is_file():
            existing = read_provenance(self.folder)
            if existing.to_json() != self.provenance.to_json():
                if not overwrite:
                    raise DiffAugError(
                        f"{self.folder} already holds a synthetic dataset with different provenance "
                        f"({prov_path}). Pass --overwrite to replace it, or choose another output dataset.")
                self._wipe()
        elif self.folder.is_dir() and any(not is_lock_file(p) for p in self.folder.iterdir()):
            if not overwrite:
                raise DiffAugError(f"{self.folder} exists and is not a synthetic dataset written by nnunet-diffaug; "
                                   f"refusing to write into it. Pass --overwrite to replace it.")
            self._wipe()
        for sub in ("imagesTr", "labelsTr", CASE_RECORDS_DIR):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.folder)
        if not prov_path.is_file():
            atomic_write_json(prov_path, self.provenance.to_json())
        # the same provenance names the same synthesizer weights: an older set continued gets the file too
        if self.seen_data is not None and not (self.folder / SEEN_DATA_FILE).is_file():
            atomic_write_json(self.folder / SEEN_DATA_FILE, self.seen_data)
        self._write_dataset_json()

    def _wipe(self) -> None:
        for p in self.folder.iterdir():
            if is_lock_file(p):
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _write_dataset_json(self) -> None:
        rj = self.real_dataset_json
        dj = {
            "channel_names": rj["channel_names"],
            "labels": rj["labels"],
            "numTraining": len(self.complete_cases()),
            "file_ending": self.file_ending,
            "name": self.folder.name,
            "description": f"Synthetic cases made by nnunet-diffaug from {self.provenance.source_dataset}, "
                           f"fold {self.provenance.fold} training cases; see {PROVENANCE_FILE}.",
        }
        for optional in ("overwrite_image_reader_writer",):
            if optional in rj:
                dj[optional] = rj[optional]
        atomic_write_json(self.folder / "dataset.json", dj)

    def complete_cases(self) -> list[str]:
        return sorted(list_cases(self.folder, {**self.real_dataset_json, "file_ending": self.file_ending}))

    def has_case(self, case_id: str) -> bool:
        ending = self.file_ending
        return label_file(self.folder, case_id, ending).is_file() and all(
            image_file(self.folder, case_id, c, ending).is_file() for c in range(num_channels(self.real_dataset_json)))

    def write_case(self, case_id: str, images: list, label, record: dict) -> None:
        """Writes one case: everything is encoded into a hidden staging folder first (the slow part),
        then renamed into place, channel images and record first and the label last (the commit
        point). A killed writer leaves at most a staging folder, which the next run removes."""
        validate_case_id(case_id)
        n = num_channels(self.real_dataset_json)
        if len(images) != n:
            raise DiffAugError(f"Synthetic case {case_id}: {len(images)} channel image(s) given, "
                               f"the dataset declares {n}.")
        staging = self.folder / temporary_name(f"case-{case_id}")
        shutil.rmtree(staging, ignore_errors=True)
        final = [image_file(self.folder, case_id, c, self.file_ending) for c in range(n)]
        final += [self.folder / CASE_RECORDS_DIR / f"{case_id}.json", label_file(self.folder, case_id, self.file_ending)]
        staged = [staging / p.name for p in final]
        try:
            for img, path in zip(images, staged[:n]):
                atomic_write_image(img, path)
            atomic_write_json(staged[n], record)
            atomic_write_image(label, staged[n + 1])
            for src, dst in zip(staged, final):
                os.replace(src, dst)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def finalize(self) -> int:
        """Brings dataset.json's numTraining up to date (under the lock). Returns the number of cases."""
        with folder_lock(self.folder):
            self._write_dataset_json()
        return len(self.complete_cases())
