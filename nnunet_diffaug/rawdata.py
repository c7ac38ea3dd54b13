"""Read, validate and write nnU-Net raw datasets, and the provenance of synthetic ones.

This module is the only meeting point of the generative side (``synthesis``) and the nnU-Net side
(``trainers``): the synthesizer writes a raw dataset with :class:`SyntheticDatasetWriter`, the trainer
finds it with :func:`find_synthetic_datasets` and checks it with :func:`check_synthetic_matches_real`.

On-disk contract of a synthetic raw dataset (a valid nnU-Net raw dataset plus two extras)::

    DatasetYYY_<Source>SynthF<fold>/
        dataset.json                 labels, channel_names and file_ending copied from the real dataset
        imagesTr/<case>_0000<ending> ...
        labelsTr/<case><ending>      written LAST: a case is complete iff its label exists
        diffaug_provenance.json      source dataset, fold, training cases, generator, seed
        diffaug_cases/<case>.json    where each case came from (label source, seed, ...)

Every file is written atomically (temporary sibling, then ``os.replace``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from nnunet_diffaug.errors import DiffAugError

PROVENANCE_FILE = "diffaug_provenance.json"
CASE_RECORDS_DIR = "diffaug_cases"
LOCK_FILE = ".diffaug.lock"
PROVENANCE_FORMAT = 1
_TMP_PREFIX = ".partial-"


# ----------------------------------------------------------------------------------------------
# atomic writes and locking
# ----------------------------------------------------------------------------------------------

_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TMP_NAME = re.compile(r"^\.partial-(\d+)-([0-9a-f]{8})-")
_FOREIGN_TMP_MAX_AGE_S = 24 * 3600


def temporary_name(name: str) -> str:
    """A hidden name that records which process (pid, host) owns the temporary, so that cleaning up
    after a killed run never touches the files of a writer that is still running (-num_parts)."""
    return f"{_TMP_PREFIX}{os.getpid()}-{_HOST_TAG}-{name}"


def _temporary_sibling(path: Path) -> Path:
    # keep the full file name as suffix so writers that choose the format by extension still work
    return path.with_name(temporary_name(path.name))


def _owner_is_gone(path: Path) -> bool:
    m = _TMP_NAME.match(path.name)
    if m is None or m.group(2) != _HOST_TAG:
        # another host's (or an unknown) temporary: only when it is clearly abandoned
        try:
            return time.time() - path.stat().st_mtime > _FOREIGN_TMP_MAX_AGE_S
        except FileNotFoundError:
            return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling of ``path``; on success it replaces ``path`` in one step.

    On failure (including a full disk) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DiffAugError(f"No space left on device while writing {path}; nothing was changed there.") from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_image(image, path: str | os.PathLike) -> None:
    """Writes a SimpleITK image atomically (the temporary name keeps the extension)."""
    import SimpleITK as sitk
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Deletes leftovers of interrupted writes below ``folder`` whose writer is gone. Returns how many."""
    import shutil
    n = 0
    for p in sorted(Path(folder).rglob(f"{_TMP_PREFIX}*")):
        if p.exists() and _owner_is_gone(p):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
    return n


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, timeout_s: float = 600.0, name: str = LOCK_FILE,
                holder: str = "another process") -> Iterator[None]:
    """An exclusive advisory lock on ``folder``. A second holder waits up to ``timeout_s``, then refuses.
    The lock dies with its process (flock), so a lock file left by a killed run blocks nothing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / name
    with open(lock_path, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DiffAugError(f"{folder} is locked by {holder} (lock file {lock_path}); waited "
                                       f"{timeout_s:.0f} s. Wait for it to finish, then run again.") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# reading and validating raw datasets
# ----------------------------------------------------------------------------------------------

def _is_lock_file(path: Path) -> bool:
    return path.name.startswith(".diffaug") and path.name.endswith(".lock")


_SAFE_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")


def validate_case_id(case_id: str, where: str = "") -> str:
    """Case identifiers become file names: refuse separators, '..' and other surprises."""
    if not isinstance(case_id, str) or not _SAFE_CASE_ID.match(case_id) or ".." in case_id:
        raise DiffAugError(f"Invalid case identifier {case_id!r}{' in ' + where if where else ''}: "
                           f"use letters, digits, '_', '-' and '.', no path separators and no '..'.")
    return case_id


def read_json(path: str | os.PathLike, if_missing: str = ""):
    """Parses a JSON file; a missing or malformed file is a DiffAugError naming it (``if_missing`` says why
    the file matters or what to run)."""
    path = Path(path)
    if not path.is_file():
        raise DiffAugError(f"{path} does not exist{': ' + if_missing if if_missing else '.'}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DiffAugError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise DiffAugError(f"{path} is not a text (JSON) file.") from None


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


# ----------------------------------------------------------------------------------------------
# provenance of synthetic datasets
# ----------------------------------------------------------------------------------------------

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


def synthetic_dataset_name(dataset_id: int, source_dataset_name: str, fold: int) -> str:
    source_task = source_dataset_name.split("_", 1)[1] if "_" in source_dataset_name else source_dataset_name
    return f"Dataset{dataset_id:03d}_{source_task}SynthF{fold}"


def next_free_dataset_id(start: int = 900) -> int:
    """The smallest dataset id >= start not used in nnUNet_raw, nnUNet_preprocessed or nnUNet_results."""
    from nnunet_diffaug import paths
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


# Provenance ``generator.role`` of a set that is not meant for training: the candidates a judge filters
# (``diffaug_synthesize --judge``). Finding "the synthetic set of a fold" skips them; naming one still works.
CANDIDATES_ROLE = "judge-candidates"


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


# ----------------------------------------------------------------------------------------------
# writing synthetic datasets
# ----------------------------------------------------------------------------------------------

class SyntheticDatasetWriter:
    """Writes synthetic cases into a raw dataset folder, one complete case at a time.

    Safe to use from several processes on the same folder (``-num_parts/-part_id``): each case is
    written atomically with its label last, and dataset.json is updated under a lock.
    """

    def __init__(self, folder: str | os.PathLike, real_dataset_json: dict, provenance: SyntheticProvenance,
                 overwrite: bool = False):
        self.folder = Path(folder)
        self.real_dataset_json = real_dataset_json
        self.provenance = provenance
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
        elif self.folder.is_dir() and any(not _is_lock_file(p) for p in self.folder.iterdir()):
            if not overwrite:
                raise DiffAugError(f"{self.folder} exists and is not a synthetic dataset written by nnunet-diffaug; "
                                   f"refusing to write into it. Pass --overwrite to replace it.")
            self._wipe()
        for sub in ("imagesTr", "labelsTr", CASE_RECORDS_DIR):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.folder)
        if not prov_path.is_file():
            atomic_write_json(prov_path, self.provenance.to_json())
        self._write_dataset_json()

    def _wipe(self) -> None:
        for p in self.folder.iterdir():
            if _is_lock_file(p):
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
