"""Judge-filtered synthesis: keep only the synthetic cases that a real-trained nnU-Net reads correctly.

A synthesizer trained on a few cases paints some cases that do not match their labels (a thin structure
drawn as soft tissue). Published pipelines gain several Dice points by keeping only the cases that a
segmenter trained on REAL data agrees with, while selecting by image realism alone did not help
downstream. Here the judge is any nnU-Net model of the same fold trained on real cases only: it segments
each candidate (nnU-Net's predictor), the candidate's score is the mean Dice of that segmentation against
the candidate's own label map over the classes the label map holds, and the best ``keep`` candidates
(optionally each class above a floor) are written as a new synthetic dataset. Every candidate's score is
recorded (case records and ``diffaug_judge_summary.json``).

Why the judge must be trained on this fold's real training cases only: a judge that saw the fold's
validation cases would select synthetic cases that resemble them (a leak into validation), and a judge
trained with synthetic cases would prefer the synthesizer's own mistakes.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_diffaug import paths
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import atomic_write_json, read_json, remove_stale_temporaries
from nnunet_diffaug.provenance import (CANDIDATES_ROLE, CASE_RECORDS_DIR, SyntheticProvenance, read_provenance,
                                       read_seen_data)
from nnunet_diffaug.raw_dataset import list_cases, load_dataset_json, read_fold
from nnunet_diffaug.synthetic_sets import (check_synthetic_matches_real, output_folder,
                                           synthetic_dataset_name)
from nnunet_diffaug.synthetic_writer import SyntheticDatasetWriter

SUMMARY_FILE = "diffaug_judge_summary.json"
SCORES_DIR = "diffaug_judge_scores"      # inside the candidate set: one record per judged candidate
BLIND_CLASS_DICE = 0.1   # below this Dice on its own validation cases, a judge does not read a class


@dataclass
class Judge:
    model_folder: Path
    checkpoint: str = "checkpoint_final.pth"
    use_mirroring: bool = True           # nnU-Net's test-time mirroring, as its predictor; off: up to 8x faster in 3D


def judge_folder(dataset_name: str, model: str | None, trainer: str, plans: str, configuration: str) -> Path:
    """``--judge FOLDER`` as given, else nnU-Net's results folder of (-tr, -p, -c)."""
    if model:
        return Path(model).resolve()
    return paths.nnunet_results() / dataset_name / f"{trainer}__{plans}__{configuration}"


def resolve_judge(dataset_name: str, text: str, what: str = "--judge") -> Path:
    """A judge given as a model folder, or as its name TRAINER__PLANS__CONFIG in ``$nnUNet_results/<dataset>/``."""
    model = text if os.sep in text or os.path.isdir(text) else None
    name = None if model else text.split("__")
    if name is not None and len(name) != 3:
        raise DiffAugError(f"{what} {text!r} is neither a folder nor a model name TRAINER__PLANS__CONFIG.")
    return judge_folder(dataset_name, model, *(name or ("", "", "")))


def check_judge_space(judge: Judge, plans_identifier: str, configuration: str, plans_manager) -> None:
    """Refuses a judge that does not work in the preprocessed space of (``plans_identifier``, ``configuration``):
    other plans or another configuration (named as nnUNetv2_train names its model folders,
    TRAINER__PLANS__CONFIGURATION), or plans of the same name that were planned differently since (its copy of the
    plans differs in that configuration, the intensity normalisation or the axis order). ``plans_manager``: nnU-Net's
    PlansManager of the plans the caller works in."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    folder = judge.model_folder
    parts = folder.name.split("__")
    if len(parts) != 3:
        raise DiffAugError(f"{folder}: not named TRAINER__PLANS__CONFIGURATION as nnUNetv2_train names its model "
                           f"folders, so its plans and configuration cannot be told; use the folder nnUNetv2_train "
                           f"wrote.")
    plans = read_json(folder / "plans.json")
    theirs = plans.get("plans_name", parts[1])
    if theirs != plans_identifier or parts[1] != plans_identifier:
        raise DiffAugError(f"{folder}: the judge was trained with plans {theirs!r}, not {plans_identifier!r}; both "
                           f"must work in the same preprocessed space. Train the judge with -p {plans_identifier}.")
    if parts[2] != configuration:
        raise DiffAugError(f"{folder}: the judge was trained on configuration {parts[2]!r}, not {configuration!r}; "
                           f"both must work in the same preprocessed space. Train the judge with {configuration}.")
    manager = PlansManager(plans)
    same = (configuration in manager.available_configurations
            and manager.get_configuration(configuration).configuration
            == plans_manager.get_configuration(configuration).configuration
            and manager.foreground_intensity_properties_per_channel
            == plans_manager.foreground_intensity_properties_per_channel
            and list(manager.transpose_forward) == list(plans_manager.transpose_forward))
    if not same:
        raise DiffAugError(f"{folder / 'plans.json'}: the judge's copy of {plans_identifier} differs from the plans in "
                           f"nnUNet_preprocessed in configuration {configuration!r}, the intensity normalisation or "
                           f"the axis order: the dataset was planned again since the judge was trained. Retrain the "
                           f"judge on the current plans.")


def check_judge(judge: Judge, dataset_name: str, fold: int, real_json: dict) -> None:
    """Refuses a judge that is not a finished real-data model of this dataset's fold ``fold``."""
    from nnunet_diffaug.evaluation.inputs import check_model_folder
    folder = judge.model_folder
    check_model_folder(folder, dataset_name, fold, judge.checkpoint, real_json,
                       f"nnUNetv2_train {dataset_name} <configuration> {fold}")
    summary = folder / f"fold_{fold}" / "validation" / "summary.json"
    if not summary.is_file():
        raise DiffAugError(f"{summary} does not exist: the judge has no final validation, so which cases it held "
                           f"out cannot be checked. Let its nnUNetv2_train run finish (or run it with --val).")
    ending = real_json["file_ending"]
    judged = sorted(Path(c["reference_file"]).name[:-len(ending)]
                    for c in read_json(summary)["metric_per_case"])
    _, validation = read_fold(paths.nnunet_preprocessed() / dataset_name, fold)
    if judged != sorted(validation):
        raise DiffAugError(f"{summary}: the judge was validated on {judged[:4]}{'...' if len(judged) > 4 else ''}, "
                           f"not on fold {fold}'s validation cases {sorted(validation)[:4]}: it was trained on "
                           f"another fold or split. Use a model trained on fold {fold} of {dataset_name}.")
    debug = folder / f"fold_{fold}" / "debug.json"
    synthetic = read_json(debug).get("synthetic_dataset_folder") if debug.is_file() else None
    if synthetic not in (None, "None", ""):
        raise DiffAugError(f"{debug}: the judge was trained with synthetic cases ({synthetic}). A judge must be "
                           f"trained on real cases only (e.g. nnUNetTrainer), or it rewards the synthesizer's "
                           f"own mistakes.")


def judge_validation_dice(judge: Judge, fold: int, real_json: dict) -> dict[str, float]:
    """The judge's mean Dice per class (by label name) on its fold's validation cases, from nnU-Net's
    validation/summary.json (which check_judge requires); classes nnU-Net scored NaN (never present) are left out."""
    mean = read_json(judge.model_folder / f"fold_{fold}" / "validation" / "summary.json")["mean"]
    dice = {}
    for name, value in real_json["labels"].items():
        key = str(tuple(value)) if isinstance(value, (list, tuple)) else str(value)  # regions: nnU-Net's key
        if name != "background" and key in mean and not np.isnan(mean[key]["Dice"]):
            dice[name] = float(mean[key]["Dice"])
    return dice


def blind_classes_note(judge: Judge, fold: int, validation_dice: dict[str, float], use: str) -> str | None:
    """A warning naming the classes the judge does not read on its own validation cases (``validation_dice``, from
    :func:`judge_validation_dice`), or None.

    Such a judge scores every case low on those classes (judge filtering) and gives the painter a gradient toward
    whatever its untrained channel happens to respond to (the consistency loss): no information either way."""
    blind = {n: d for n, d in validation_dice.items() if d < BLIND_CLASS_DICE}
    if not blind:
        return None
    listed = ", ".join(f"{n} (Dice {d:.2f})" for n, d in blind.items())
    them = "that class" if len(blind) == 1 else "those classes"
    return (f"note: the judge {judge.model_folder} barely reads {listed} on fold {fold}'s validation cases: its "
            f"reading of {them} is noise, and {use} gains nothing there. A judge trained longer or on more cases "
            f"may read {them}.")


def _score(dice: dict[str, float], present: list[int]) -> tuple[float, dict[str, float]]:
    """Mean Dice over the foreground classes the candidate's label map holds, and those classes' Dice."""
    per_class = {str(c): dice[str(c)] for c in present if not np.isnan(dice[str(c)])}
    return (float(np.mean(list(per_class.values()))) if per_class else 0.0), per_class


def score_candidates(candidates: Path, cases: dict, judge: Judge, fold: int, progress: bool = True,
                     device: str = "cpu") -> dict[str, dict]:
    """{case: {"score", "dice_per_class"}} for every complete candidate (``cases``: ``list_cases`` of the candidate
    set); each score is stored once (resumable)."""
    from tqdm import tqdm
    from nnunet_diffaug.evaluation.fidelity import case_dice
    from nnunet_diffaug.evaluation.nnunet_model import TrainedModel
    from nnunet_diffaug.evaluation.run import segment_once
    store = candidates / SCORES_DIR
    if store.is_dir():
        remove_stale_temporaries(store)  # a killed run's half-written score
    checkpoint = judge.model_folder / f"fold_{fold}" / judge.checkpoint
    fingerprint = {"judge": str(checkpoint), "judge_mtime_ns": checkpoint.stat().st_mtime_ns,
                   "test_time_mirroring": judge.use_mirroring}
    scores, todo = {}, []
    for cid in sorted(cases):
        record = store / f"{cid}.json"
        stored = read_json(record) if record.is_file() else None
        if stored and stored.get("fingerprint") == fingerprint:
            scores[cid] = stored
        else:
            todo.append(cid)
    if not todo:
        return scores
    model = TrainedModel(judge.model_folder, fold, judge.checkpoint, device, judge.use_mirroring)
    for cid in tqdm(todo, desc="judging candidates", disable=not progress, dynamic_ncols=True):
        case = model.preprocess(cid, cases[cid])
        present = [c for c in model.foreground_labels if np.any(case.seg == c)]
        prediction = segment_once(model, checkpoint, cid, case, cases[cid]["images"], store / "predictions",
                                  judge.use_mirroring)
        score, per_class = _score(case_dice(case.label_file, prediction, model.reader_writer,
                                            model.foreground_labels), present)
        scores[cid] = {"score": score, "dice_per_class": per_class, "fingerprint": fingerprint}
        atomic_write_json(store / f"{cid}.json", scores[cid])
    return scores


def select(scores: dict[str, dict], keep: int, min_class_dice: float | None) -> tuple[list[str], dict[str, str]]:
    """The ``keep`` best candidates (ties: case id) among those whose every class reaches the floor; why others went."""
    dropped = {}
    eligible = []
    for cid, s in scores.items():
        if min_class_dice is not None and any(v < min_class_dice for v in s["dice_per_class"].values()):
            worst = min(s["dice_per_class"].items(), key=lambda kv: kv[1])
            dropped[cid] = f"class {worst[0]} Dice {worst[1]:.3f} < floor {min_class_dice}"
        else:
            eligible.append(cid)
    ranked = sorted(eligible, key=lambda c: (-scores[c]["score"], c))
    for cid in ranked[keep:]:
        dropped[cid] = "ranked below the kept cases"
    return sorted(ranked[:keep]), dropped


def _distribution(values: list[float]) -> dict | None:
    if not values:
        return None
    q = np.percentile(values, [0, 25, 50, 75, 100])
    return {"n": len(values), "mean": float(np.mean(values)), "min": float(q[0]), "q25": float(q[1]),
            "median": float(q[2]), "q75": float(q[3]), "max": float(q[4])}


def filtered_provenance(candidate: SyntheticProvenance, judge: Judge, candidates: Path, n_candidates: int,
                        keep: int, min_class_dice: float | None) -> SyntheticProvenance:
    generator = {**candidate.generator, "judge_filter": {
        "judge": str(judge.model_folder), "checkpoint": judge.checkpoint,
        "test_time_mirroring": judge.use_mirroring, "candidates_dataset": candidates.name,
        "candidates": n_candidates, "keep": keep, "min_class_dice": min_class_dice,
        "score": "mean Dice of the judge's segmentation against the case's own label map, over its classes"}}
    generator.pop("role", None)
    return SyntheticProvenance(source_dataset=candidate.source_dataset, fold=candidate.fold,
                               configuration=candidate.configuration, training_cases=list(candidate.training_cases),
                               generator=generator, seed=candidate.seed)


def filter_synthetic_set(candidates: Path, output: Path, judge: Judge, keep: int, min_class_dice: float | None = None,
                         device: str = "cpu", progress: bool = True, overwrite: bool = False) -> dict:
    """Scores every candidate in ``candidates`` with ``judge`` and writes the kept ones to ``output``.

    Resumable: stored scores and written cases are reused. Returns the summary (also written to the output).
    """
    if keep < 1:
        raise DiffAugError(f"-n {keep}: keep at least one case.")
    if min_class_dice is not None and not 0 <= min_class_dice <= 1:
        raise DiffAugError(f"--min-class-dice {min_class_dice} must lie in [0, 1].")
    prov = read_provenance(candidates)
    real_json = load_dataset_json(paths.nnunet_raw() / prov.source_dataset)
    check_synthetic_matches_real(real_json, candidates)
    check_judge(judge, prov.source_dataset, int(prov.fold), real_json)
    validation_dice = judge_validation_dice(judge, int(prov.fold), real_json)
    note = blind_classes_note(judge, int(prov.fold), validation_dice, "judge filtering")
    if note:
        print(note, file=sys.stderr)
    cases = list_cases(candidates)
    scores = score_candidates(candidates, cases, judge, int(prov.fold), progress, device)
    if len(scores) < keep:
        raise DiffAugError(f"{candidates} holds {len(scores)} complete candidate(s), fewer than the {keep} to keep.")
    kept, dropped = select(scores, keep, min_class_dice)

    # the kept cases come from the candidates' synthesizer: what it saw goes with them, for the trainer's check
    writer = SyntheticDatasetWriter(output, real_json, filtered_provenance(prov, judge, candidates, len(scores), keep,
                                                                          min_class_dice), overwrite=overwrite,
                                    seen_data=read_seen_data(candidates))
    import SimpleITK as sitk
    for cid in kept:
        if writer.has_case(cid):
            continue
        record_file = candidates / CASE_RECORDS_DIR / f"{cid}.json"
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
        record.update({"judge_score": scores[cid]["score"], "judge_dice_per_class": scores[cid]["dice_per_class"],
                       "candidate_of": candidates.name})
        writer.write_case(cid, [sitk.ReadImage(f) for f in cases[cid]["images"]],
                          sitk.ReadImage(cases[cid]["label"]), record)
    writer.finalize()
    summary = {
        "candidates_dataset": str(candidates), "judge": str(judge.model_folder), "keep": keep,
        "min_class_dice": min_class_dice, "kept": kept, "dropped": dropped,
        "judge_validation_dice": validation_dice,
        "score_kept": _distribution([scores[c]["score"] for c in kept]),
        "score_dropped": _distribution([scores[c]["score"] for c in dropped]),
        "scores": {c: {"score": s["score"], "dice_per_class": s["dice_per_class"]} for c, s in sorted(scores.items())},
    }
    atomic_write_json(output / SUMMARY_FILE, summary)
    if len(kept) < keep:
        raise DiffAugError(f"Only {len(kept)} of {len(scores)} candidates reach --min-class-dice {min_class_dice}; "
                           f"{output} holds those {len(kept)}. Ask for more candidates (the rerun keeps what exists) "
                           f"or lower the floor.")
    return summary


def synthesize_filtered(dataset: str | int, configuration: str, fold: int, keep: int, candidates: int,
                        judge: Judge, min_class_dice: float | None = None, output_id: int | None = None,
                        overwrite: bool = False, device: str = "auto", progress: bool = True, **synthesize_kwargs) -> Path:
    """Draws ``candidates`` cases with any generator and label mode (``synthesize_kwargs`` as for
    :func:`~nnunet_diffaug.synthesis.synthesize.synthesize`), then keeps the ``keep`` the judge reads best.

    The candidates form a synthetic set of their own, marked so that trainers never pick it up; both steps
    resume. Returns the filtered dataset's folder.
    """
    from nnunet_diffaug.synthesis.synthesize import synthesize
    if candidates < keep:
        raise DiffAugError(f"--candidates {candidates} must be at least -n {keep} (the cases to keep).")
    if min_class_dice is not None and not 0 <= min_class_dice <= 1:
        raise DiffAugError(f"--min-class-dice {min_class_dice} must lie in [0, 1].")
    if synthesize_kwargs.get("num_parts", 1) != 1:
        raise DiffAugError("--judge runs in one process: the judge ranks all candidates at once (drop -num_parts).")
    dataset_name = paths.resolve_dataset_name(dataset)
    real_json = load_dataset_json(paths.nnunet_raw() / dataset_name)
    check_judge(judge, dataset_name, fold, real_json)  # before any candidate is drawn
    if output_id is not None:  # reserve the id, so that the candidate set takes another one
        (paths.nnunet_raw() / synthetic_dataset_name(output_id, dataset_name, fold)).mkdir(parents=True, exist_ok=True)
    candidate_folder = synthesize(dataset_name, configuration, fold, candidates, device=device, progress=progress,
                                  role=CANDIDATES_ROLE, **synthesize_kwargs)
    candidate_prov = read_provenance(candidate_folder)
    n_candidates = len(list_cases(candidate_folder))
    out = output_folder(dataset_name, fold, filtered_provenance(
        candidate_prov, judge, candidate_folder, n_candidates, keep, min_class_dice), output_id)
    judge_device = "cuda" if device in ("auto", "cuda") and _cuda() else "cpu"
    filter_synthetic_set(candidate_folder, out, judge, keep, min_class_dice, judge_device, progress, overwrite)
    return out


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
