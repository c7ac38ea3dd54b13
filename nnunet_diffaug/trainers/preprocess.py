"""Synthetic raw cases -> nnU-Net preprocessed data, with the REAL dataset's plans and configuration.

nnU-Net's own preprocessor does the work (``run_case_save``, one case at a time). We add:
- a folder of our own beside the real preprocessed data (nnU-Net's dataset class expects one file
  type in its folder, and automatic splits would swallow extra cases there);
- incrementality: a marker per case records what it was made from (raw files' size and mtime, and
  the configuration); only new or changed cases are processed, vanished ones are removed;
- atomicity: a case is processed into a temporary folder and moved into place; its marker is
  written last, and only cases with a valid marker are ever used.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from pathlib import Path

from tqdm import tqdm

from nnunet_diffaug.file_io import atomic_write_json, remove_stale_temporaries, temporary_name
from nnunet_diffaug.raw_dataset import check_case, list_cases

MARKER_SUFFIX = ".diffaug.json"
_CASE_FILE_SUFFIXES = (".b2nd", "_seg.b2nd", ".pkl")


def configuration_fingerprint(plans: dict, configuration: dict) -> str:
    """Changes whenever preprocessing would give different output (spacing, normalisation, intensities...)."""
    relevant = {
        "configuration": configuration,
        "foreground_intensity_properties_per_channel": plans.get("foreground_intensity_properties_per_channel"),
        "transpose_forward": plans.get("transpose_forward"),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _source_fingerprint(files: list[str]) -> list:
    return [[os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def _marker_for(case: dict, config_fp: str) -> dict:
    return {"configuration": config_fp, "source": _source_fingerprint(case["images"] + [case["label"]])}


def _case_is_current(output_folder: Path, case_id: str, expected_marker: dict) -> bool:
    marker = output_folder / f"{case_id}{MARKER_SUFFIX}"
    if not marker.is_file() or not all((output_folder / f"{case_id}{s}").is_file() for s in _CASE_FILE_SUFFIXES):
        return False
    try:
        return json.loads(marker.read_text()) == expected_marker
    except json.JSONDecodeError:
        return False


def marked_cases(output_folder: Path) -> list[str]:
    """Identifiers of the cases whose marker was written. Hidden names are skipped: the marker of a
    case being written is first a hidden temporary (atomic write), possibly another writer's."""
    return sorted(p.name[: -len(MARKER_SUFFIX)] for p in Path(output_folder).glob(f"*{MARKER_SUFFIX}")
                  if not p.name.startswith("."))


def _remove_case(output_folder: Path, case_id: str) -> None:
    # marker first: from this moment on the case is no longer considered usable
    for suffix in (MARKER_SUFFIX, *_CASE_FILE_SUFFIXES):
        (output_folder / f"{case_id}{suffix}").unlink(missing_ok=True)


def _preprocess_one(job) -> str:
    case_id, case, output_folder, plans, configuration_name, dataset_json, marker = job
    # imported here so the worker processes only need these modules when they actually run
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration_name)
    output_folder = Path(output_folder)
    _remove_case(output_folder, case_id)
    tmp = output_folder / temporary_name(case_id)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        preprocessor = configuration_manager.preprocessor_class(verbose=False)
        preprocessor.run_case_save(str(tmp / case_id), case["images"], case["label"], plans_manager,
                                   configuration_manager, dataset_json)
        for suffix in _CASE_FILE_SUFFIXES:
            os.replace(tmp / f"{case_id}{suffix}", output_folder / f"{case_id}{suffix}")
        atomic_write_json(output_folder / f"{case_id}{MARKER_SUFFIX}", marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return case_id


def preprocess_synthetic_cases(synthetic_raw_folder: str | os.PathLike, real_dataset_json: dict, plans: dict,
                               configuration_name: str, output_folder: str | os.PathLike,
                               num_processes: int = 1, verbose: bool = True,
                               expected_dimension: int | None = None) -> list[str]:
    """Brings ``output_folder`` up to date with the complete cases of ``synthetic_raw_folder``.

    Every new or changed case is checked first (``raw_dataset.check_case``): a bad case stops the run with
    a message naming its file, before anything of it is written. Returns the identifiers of the usable
    preprocessed cases (sorted).
    """
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_folder)

    config_fp = configuration_fingerprint(plans, plans["configurations"][configuration_name])
    cases = list_cases(synthetic_raw_folder, real_dataset_json)
    expected = {cid: _marker_for(case, config_fp) for cid, case in cases.items()}

    for vanished in sorted(set(marked_cases(output_folder)) - set(cases)):
        _remove_case(output_folder, vanished)
    todo = [cid for cid in cases if not _case_is_current(output_folder, cid, expected[cid])]
    for cid in todo:
        check_case(cid, cases[cid]["images"], cases[cid]["label"], real_dataset_json, expected_dimension)

    jobs = [(cid, cases[cid], str(output_folder), plans, configuration_name, real_dataset_json, expected[cid])
            for cid in todo]
    desc = f"Preprocessing {len(todo)} new synthetic case(s) with the real plans"
    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            for _ in tqdm(pool.imap_unordered(_preprocess_one, jobs), total=len(jobs), desc=desc, disable=not verbose):
                pass
    else:
        for job in tqdm(jobs, desc=desc, disable=not verbose or not jobs):
            _preprocess_one(job)
    return sorted(cid for cid in cases if _case_is_current(output_folder, cid, expected[cid]))
