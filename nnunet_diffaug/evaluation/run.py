"""One evaluation run: preprocess every case once, compute the five metric families, write the report."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_diffaug.evaluation import (background, class_intensity, diversity, fidelity, grid, inpainting,
                                       label_stats, memorisation, realism)
from nnunet_diffaug.evaluation.inputs import EvaluationInputs
from nnunet_diffaug.evaluation.montage import write_montage
from nnunet_diffaug.evaluation.nnunet_model import PreprocessedCase, TrainedModel
from nnunet_diffaug.evaluation.report import write_report
from nnunet_diffaug.file_io import atomic_write_json
from nnunet_diffaug.provenance import CASE_RECORDS_DIR

SETS = ("synthetic", "training", "validation")


@dataclass
class Settings:
    device: str = "cpu"
    use_mirroring: bool = True           # nnU-Net's test-time mirroring, as in its own validation
    max_tiles_per_case: int = 16         # encoder-feature tiles per case
    frechet_eps: float = realism.DEFAULT_EPS
    memorisation_percentile: float = memorisation.DEFAULT_PERCENTILE
    memorisation_absolute: float = memorisation.DEFAULT_ABSOLUTE
    max_ssim_pairs: int = 2000
    montage_rows: int = 4
    progress: bool = True


def default_output_folder(inputs: EvaluationInputs) -> Path:
    # one folder per judging model, so evaluations with different models do not replace each other
    return inputs.synthetic_folder / "diffaug_evaluation" / inputs.model_folder.name / f"fold_{inputs.fold}"


def _case_sets(inputs: EvaluationInputs) -> dict[str, dict]:
    return {"synthetic": inputs.synthetic_cases,
            "training": {c: inputs.real_cases[c] for c in inputs.training_cases},
            "validation": {c: inputs.real_cases[c] for c in inputs.validation_cases}}


def _source_case(inputs: EvaluationInputs, case_id: str) -> str | None:
    record = inputs.synthetic_folder / CASE_RECORDS_DIR / f"{case_id}.json"
    try:
        return json.loads(record.read_text()).get("source_case") if record.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        return None


def segment_once(model: TrainedModel, checkpoint_file: Path, cid: str, case: PreprocessedCase,
                 image_files: list[str], folder: Path, use_mirroring: bool) -> Path:
    """nnU-Net's prediction of one case, reused from an earlier run when nothing it depends on changed
    (the model's checkpoint, test-time mirroring, the case's image files).

    Segmenting is the slow part of an evaluation (minutes per case on a CPU with default plans); a run that
    fails or is stopped later must not have to redo it.
    """
    def stat(f):
        st = os.stat(f)
        return [str(f), st.st_size, st.st_mtime_ns]
    fingerprint = {"checkpoint": stat(checkpoint_file), "test_time_mirroring": use_mirroring,
                   "images": [stat(f) for f in image_files]}
    record = Path(folder) / f"{cid}.prediction.json"
    if record.is_file():
        try:
            stored = json.loads(record.read_text())
        except json.JSONDecodeError:
            stored = None
        if stored and stored.get("fingerprint") == fingerprint and Path(stored["file"]).is_file():
            return Path(stored["file"])
    prediction = model.segment(case, Path(folder) / cid)
    atomic_write_json(record, {"file": str(prediction), "fingerprint": fingerprint})
    return prediction


def _label_fidelity(model: TrainedModel, inputs: EvaluationInputs, pre: dict, out: Path, s: Settings):
    labels = model.foreground_labels
    predictions, per_case = {}, {}
    for cid, case in tqdm(pre["synthetic"].items(), desc="segmenting synthetic cases", disable=not s.progress):
        predictions[cid] = segment_once(model, inputs.checkpoint_file, cid, case,
                                        inputs.synthetic_cases[cid]["images"], out / "predictions_synthetic",
                                        s.use_mirroring)
        per_case[cid] = fidelity.case_dice(case.label_file, predictions[cid], model.reader_writer, labels)
    synthetic = fidelity.summarise(per_case, labels)
    # nnU-Net's own final validation is reused when it was made the same way (mirroring on, same checkpoint)
    real = fidelity.validation_summary(inputs.model_folder, inputs.fold) \
        if s.use_mirroring and inputs.checkpoint == "checkpoint_final.pth" else None
    validation_predictions = {}
    if real is None:
        real_cases = {}
        for cid, case in tqdm(pre["validation"].items(), desc="segmenting validation cases", disable=not s.progress):
            f = validation_predictions[cid] = segment_once(model, inputs.checkpoint_file, cid, case,
                                                           inputs.real_cases[cid]["images"],
                                                           out / "predictions_validation", s.use_mirroring)
            real_cases[cid] = fidelity.case_dice(case.label_file, f, model.reader_writer, labels)
        real = {**fidelity.summarise(real_cases, labels),
                "source": "predicted here with the same settings as the synthetic cases"}
    return {"synthetic": synthetic, "validation": real,
            "ratio_synthetic_to_validation": synthetic["foreground_mean_dice"] / real["foreground_mean_dice"]
            if real["foreground_mean_dice"] > 0 else float("nan"),
            "test_time_mirroring": s.use_mirroring}, per_case, predictions, validation_predictions


def _real_predictions(model: TrainedModel, inputs: EvaluationInputs, pre: dict, out: Path, s: Settings,
                      validation_predictions: dict) -> tuple[dict[str, dict[str, Path]], dict[str, str]]:
    """The judge's prediction of every training and validation case, for the background false positives.

    Validation: the files label fidelity segmented here, or, when it reused nnU-Net's own final validation,
    the predictions nnU-Net wrote beside that summary (made the same way: final checkpoint, mirroring on);
    a case missing there is segmented here. Training: segmented here (label fidelity never needs them), once,
    and reused by a rerun like every other segmentation. Returns the files and, per set, where they came from.
    """
    files: dict[str, dict[str, Path]] = {"training": {}, "validation": dict(validation_predictions)}
    sources = {"training": "predicted here with the same settings as the synthetic cases",
               "validation": "predicted here with the same settings as the synthetic cases"}
    if not validation_predictions:
        nnunet_folder = inputs.model_folder / f"fold_{inputs.fold}" / "validation"
        ending = model.predictor.dataset_json["file_ending"]
        for cid in pre["validation"]:
            if (nnunet_folder / f"{cid}{ending}").is_file():
                files["validation"][cid] = nnunet_folder / f"{cid}{ending}"
        if files["validation"]:
            sources["validation"] = f"nnU-Net's final validation predictions ({nnunet_folder})" + (
                "" if len(files["validation"]) == len(pre["validation"]) else "; the cases missing there predicted "
                "here with the same settings as the synthetic cases")
    for name in ("validation", "training"):
        todo = {cid: case for cid, case in pre[name].items() if cid not in files[name]}
        for cid, case in tqdm(todo.items(), desc=f"segmenting {name} cases", disable=not s.progress or not todo):
            files[name][cid] = segment_once(model, inputs.checkpoint_file, cid, case,
                                            inputs.real_cases[cid]["images"], out / f"predictions_{name}",
                                            s.use_mirroring)
    return files, sources


def _background_false_positives(model: TrainedModel, pre: dict, predictions: dict[str, dict[str, Path]],
                                sources: dict[str, str]) -> tuple[dict, dict[str, float]]:
    """Per set: the judge's false positives among background voxels (``background``), and each synthetic
    case's share. Label and prediction on the grid label fidelity's Dice uses (the case's raw geometry)."""
    classes, read = model.foreground_labels, model.reader_writer.read_seg
    report, synthetic_shares = {}, {}
    for name in SETS:
        counts = {cid: background.case_background_counts(read(case.label_file)[0], read(str(predictions[name][cid]))[0],
                                                          classes)
                  for cid, case in pre[name].items()}
        report[name] = {**background.summarise_false_positives(counts, classes), "predictions": sources[name]}
        if name == "synthetic":
            synthetic_shares = {cid: background.share(c) for cid, c in counts.items()}
    return report, synthetic_shares


def _unit_items(model: TrainedModel, pre: dict) -> dict[str, list[tuple[str, np.ndarray, np.ndarray]]]:
    """(case id, image item in [0, 1], label item) per set on one grid: what diversity and memorisation compare."""
    def items_of(c):
        return zip(grid.items_of(c.data, model.spatial_dims), grid.items_of(c.seg, model.spatial_dims))
    items = {k: [(cid, it, lab) for cid, c in pre[k].items() for it, lab in items_of(c)] for k in SETS}
    ranges = grid.intensity_range([it for k in ("training", "validation") for _, it, _ in items[k]])
    shape = grid.common_shape([it for k in SETS for _, it, _ in items[k]])
    return {k: [(cid, grid.to_shape(grid.to_unit_range(it, ranges), shape), grid.to_shape(lab, shape))
                for cid, it, lab in v] for k, v in items.items()}


def _memorisation(items: dict, classes: list[int], s: Settings) -> dict:
    """Synthetic items against the training items (the only cases a generator can have copied)."""
    synthetic, training = items["synthetic"], items["training"]
    return memorisation.memorisation_report(
        {f"{cid}#{i}": memorisation.coarse(it) for i, (cid, it, _) in enumerate(synthetic)},
        {f"{cid}#{i}": memorisation.coarse(it) for i, (cid, it, _) in enumerate(training)},
        {f"{cid}#{i}": memorisation.coarse_fractions(lab, [0] + classes) for i, (cid, _, lab) in enumerate(training)},
        [cid for cid, _, _ in synthetic], [cid for cid, _, _ in training],
        s.memorisation_percentile, s.memorisation_absolute)


def evaluate(inputs: EvaluationInputs, output_folder: str | Path | None = None,
             settings: Settings | None = None) -> dict:
    """Runs every metric and writes evaluation.json, evaluation.md and evaluation_montage.png. Returns the JSON."""
    s = settings or Settings()
    out = Path(output_folder) if output_folder else default_output_folder(inputs)
    t0 = time.perf_counter()
    model = TrainedModel(inputs.model_folder, inputs.fold, inputs.checkpoint, s.device, s.use_mirroring)
    sets = _case_sets(inputs)

    # every case once through nnU-Net's preprocessing; all image metrics work in that space
    pre: dict[str, dict[str, PreprocessedCase]] = {}
    for name, cases in sets.items():
        pre[name] = {cid: model.preprocess(cid, case)
                     for cid, case in tqdm(cases.items(), desc=f"preprocessing {name} cases", disable=not s.progress)}

    fidelity_result, fid_per_case, predictions, validation_predictions = _label_fidelity(model, inputs, pre, out, s)
    real_predictions, prediction_sources = _real_predictions(model, inputs, pre, out, s, validation_predictions)
    false_positives, fp_per_case = _background_false_positives(
        model, pre, {"synthetic": predictions, **real_predictions},
        {"synthetic": "label fidelity's predictions", **prediction_sources})
    inpainted, clip = None, model.ct_clip_range()
    if inputs.provenance is not None and inputs.provenance.generator.get("label_mode") == "inpaint":
        inpainted = inpainting.inpainting_report(inputs.synthetic_cases,
                                                 {cid: _source_case(inputs, cid) for cid in inputs.synthetic_cases},
                                                 inputs.real_cases, predictions, model.foreground_labels, clip)

    features = {k: np.concatenate([model.encoder_features(c.data, s.max_tiles_per_case)
                                   for c in tqdm(pre[k].values(), desc=f"encoder features ({k})",
                                                 disable=not s.progress)]) for k in SETS}
    realism_result = realism.realism_report(features, s.frechet_eps)
    # the same tiles' label content (positions depend on the shape only): features are not computed again
    tile_background = {k: np.concatenate([model.tile_background_shares(c.seg, s.max_tiles_per_case)
                                          for c in pre[k].values()]) for k in SETS}
    background_realism = background.realism_by_content(features, tile_background, s.frechet_eps)

    items = _unit_items(model, pre)
    ssim_settings = diversity.choose_settings(items["synthetic"][0][1].shape[1:])
    div = {k: diversity.pairwise_ms_ssim([it for _, it, _ in items[k]], [cid for cid, _, _ in items[k]],
                                         ssim_settings, s.max_ssim_pairs, desc=f"MS-SSIM ({k})") for k in SETS}
    div["settings"] = ssim_settings.as_dict()

    classes = model.foreground_labels
    memo = _memorisation(items, classes, s)
    stats = {k: [label_stats.case_label_stats(label_stats.read_label(c["label"]), classes) for c in sets[k].values()]
             for k in SETS}
    lab = label_stats.label_stats_report(stats, classes)
    intensity = class_intensity.class_intensity_report(
        {k: [class_intensity.case_class_means(c.data, c.seg, classes) for c in pre[k].values()] for k in SETS}, classes)

    per_case = {cid: {"source_case": _source_case(inputs, cid), "dice": fid_per_case[cid],
                      **{f"memorisation_{k}": v for k, v in memo["per_case"][cid].items()},
                      "background_false_positive_share": fp_per_case[cid]}
                for cid in inputs.synthetic_cases}
    result = {
        "dataset": inputs.dataset_name, "fold": inputs.fold,
        "synthetic_dataset": str(inputs.synthetic_folder),
        "model": {"folder": str(inputs.model_folder), "checkpoint": str(inputs.checkpoint_file),
                  "configuration": inputs.model_folder.name.split("__")[-1]},
        "cases": {k: sorted(v) for k, v in sets.items()},
        "class_names": model.class_names(),
        "label_fidelity": fidelity_result, "realism": realism_result, "diversity": div, "label_statistics": lab,
        "class_intensity": intensity,
        "background": {"false_positives": false_positives, "realism": background_realism},
        **({"inpainting": inpainted} if inpainted is not None else {}),
        "memorisation": {k: v for k, v in memo.items() if k != "per_case"},
        "per_synthetic_case": per_case,
        "notes": list(inputs.notes) + _memorisation_notes(per_case),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    rows = _montage_rows(inputs, predictions, s.montage_rows)
    write_montage(rows, out / "evaluation_montage.png", len(classes),
                  f"{inputs.synthetic_folder.name} vs {inputs.dataset_name} fold {inputs.fold}",
                  inpainted=inpainted is not None, clip=clip)
    write_report(result, out)
    result["output_folder"] = str(out)
    return result


def _memorisation_notes(per_case: dict) -> list[str]:
    with_source = [c for c, r in per_case.items() if r["source_case"]]
    if not with_source:
        return []
    same = sum(per_case[c]["memorisation_nearest_training_case"] == per_case[c]["source_case"] for c in with_source)
    reused = sum(per_case[c]["memorisation_reused_anatomy"] for c in with_source)
    return [f"{len(with_source)} synthetic case(s) record a real source case (their label map was made from a "
            f"training case), and for {same} of them that case is also the nearest training image. Anatomy reused "
            f"from a training label map is by design in that mode and makes the image distance small, so a case is "
            f"flagged as a near-copy only when its texture distance (what the label map does not explain) is small "
            f"too. Reused anatomy (close in image distance only, not flagged): {reused} of them."]


def _montage_rows(inputs: EvaluationInputs, predictions: dict, n: int) -> list[dict]:
    """Each shown synthetic case beside its source case when its record names one, else a validation case."""
    rows = []
    for i, cid in enumerate(sorted(inputs.synthetic_cases)[:n]):
        src = _source_case(inputs, cid)
        real_id = src if src in inputs.real_cases else inputs.validation_cases[i % len(inputs.validation_cases)]
        real, syn = inputs.real_cases[real_id], inputs.synthetic_cases[cid]
        rows.append({"real": {"name": real_id, "image": real["images"][0], "label": real["label"]},
                     "synthetic": {"name": cid, "image": syn["images"][0], "label": syn["label"]},
                     "prediction": predictions.get(cid)})
    return rows
