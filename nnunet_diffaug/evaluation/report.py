"""evaluation.json (everything) and evaluation.md (the summary a person reads), written atomically."""
from __future__ import annotations

import math
from pathlib import Path

from nnunet_diffaug.file_io import atomic_write_json, atomic_write_text

CASES_USED = "\n".join([
    "| metric | synthetic cases | real cases | why these |",
    "|---|---|---|---|",
    "| label fidelity | all evaluated | validation of the fold | the model was trained on the training cases; "
    "its Dice there would flatter it |",
    "| realism (Fréchet) | all evaluated | target: validation; reference: training vs validation | validation "
    "cases were seen by neither the model nor the synthesizer |",
    "| diversity (MS-SSIM) | pairs among synthetic | pairs among training, among validation (pairs within one "
    "case skipped) | each set's own spread |",
    "| label statistics | all evaluated | target: validation; reference: training vs validation | as for realism |",
    "| class intensity | all evaluated | training and validation together | a synthesizer should paint like both |",
    "| background false positives | all evaluated | target: validation; training (seen by the judge) as a second "
    "real value | as for label fidelity |",
    "| background realism (Fréchet by tile content) | all evaluated | as for realism | as for realism |",
    "| memorisation | nearest training case | training cases among themselves (leave-one-case-out) | only the "
    "training cases can have been memorised |",
]) + "\n"


def json_safe(obj):
    """NaN/inf -> null (strict JSON), numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _f(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _class(r: dict, value: str) -> str:
    """A class as the report shows it: its dataset.json name and label value (the JSON keys stay the values)."""
    name = r.get("class_names", {}).get(str(value))
    return f"{name} ({value})" if name else str(value)


def _nearest_list(r: dict, cases: list[str]) -> str:
    return ", ".join(f"{c} (~{r['per_synthetic_case'][c]['memorisation_nearest_training_case']})" for c in cases)


def render_markdown(r: dict) -> str:
    fid, rea, div, lab, mem = (r["label_fidelity"], r["realism"], r["diversity"], r["label_statistics"],
                               r["memorisation"])
    n = {k: len(v) for k, v in r["cases"].items()}
    lines = [
        f"# Synthesis quality: {Path(r['synthetic_dataset']).name}",
        "",
        f"Real dataset {r['dataset']}, fold {r['fold']} ({n['training']} training, {n['validation']} validation "
        f"cases); {n['synthetic']} synthetic cases. Judge: the nnU-Net model `{r['model']['checkpoint']}`.",
        "",
        "| metric | synthetic | real reference | better when |",
        "|---|---|---|---|",
        f"| label fidelity: mean foreground Dice of nnU-Net vs the cases' own labels | "
        f"{_f(fid['synthetic']['foreground_mean_dice'])} | {_f(fid['validation']['foreground_mean_dice'])} "
        f"(validation cases) | synthetic close to real |",
        f"| realism: Fréchet distance of encoder features to the validation cases | "
        f"{_f(rea['frechet_synthetic_vs_validation'], 2)} | {_f(rea['frechet_training_vs_validation'], 2)} "
        f"(training cases) | synthetic close to real |",
        f"| diversity: mean pairwise MS-SSIM | {_f(div['synthetic']['mean'])} | "
        f"{_f(div['training']['mean'])} (training), {_f(div['validation']['mean'])} (validation) | "
        f"synthetic not above real |",
        f"| label statistics: mean W1 of per-class volume fractions to validation | "
        f"{_f(lab['mean_fraction_w1_synthetic_vs_validation'], 4)} | "
        f"{_f(lab['mean_fraction_w1_training_vs_validation'], 4)} (training) | synthetic close to real |",
        f"| label statistics: mean W1 of connected-component counts to validation | "
        f"{_f(lab['mean_components_w1_synthetic_vs_validation'], 2)} | "
        f"{_f(lab['mean_components_w1_training_vs_validation'], 2)} (training) | synthetic close to real |",
        f"| class intensity: largest standardised difference of a class's mean intensity: "
        f"{_class(r, r['class_intensity']['worst_class'])} | {_f(r['class_intensity']['worst_standardised_difference'], 2)} | "
        f"0 | below ~1 (within the real spread) |",
        *_background_rows(r),
        f"| memorisation: median distance to the nearest training case | {_f(mem['synthetic_nearest_median'])} | "
        f"{_f(mem['real_nearest_median'])} (training to training) | synthetic not far below real |",
        f"| memorisation: median texture distance (label map's class means removed) to the nearest training case | "
        f"{_f(mem['synthetic_texture_nearest_median'])} | {_f(mem['real_texture_nearest_median'])} (training to "
        f"training) | synthetic not far below real |",
        "",
        f"**Near-copies flagged: {len(mem['flagged'])}** "
        f"(image distance below {_f(mem['threshold_from_real'], 4)} and texture distance below "
        f"{_f(mem['texture_threshold_from_real'], 4)}, the {mem['threshold_percentile']:g}th percentiles of "
        f"real-to-real nearest distances; a distance below {mem['threshold_absolute']:g} always counts as close)"
        + (": " + _nearest_list(r, mem["flagged"]) if mem["flagged"] else "."),
        "",
        f"Reused anatomy (close in image distance only: a training case's label map with new texture): "
        f"{len(mem['reused_anatomy'])}" + (": " + _nearest_list(r, mem["reused_anatomy"]) if mem["reused_anatomy"]
                                           else "."),
        "",
        "## Label fidelity per class",
        "",
        "| class | synthetic Dice | validation Dice | volume fraction synthetic / training / validation | "
        "components synthetic / training / validation |",
        "|---|---|---|---|---|",
    ]
    for c, row in lab["per_class"].items():
        fm, cm = row["fraction_mean"], row["components_mean"]
        lines.append(f"| {_class(r, c)} | {_f(fid['synthetic']['mean_dice_per_class'].get(c))} | "
                     f"{_f(fid['validation']['mean_dice_per_class'].get(c))} | "
                     f"{_f(fm['synthetic'], 4)} / {_f(fm['training'], 4)} / {_f(fm['validation'], 4)} | "
                     f"{_f(cm['synthetic'], 1)} / {_f(cm['training'], 1)} / {_f(cm['validation'], 1)} |")
    lines += [
        "",
        "## Intensity per class (channel 0, nnU-Net-normalised)",
        "",
        "| class | synthetic mean | real mean (± sd over cases) | standardised difference |",
        "|---|---|---|---|",
    ]
    for c, row in r["class_intensity"]["per_class"].items():
        lines.append(f"| {_class(r, c)} | {_f(row['mean']['synthetic'][0])} | {_f(row['real_mean'][0])} ± "
                     f"{_f(row['real_sd'][0])} | {_f(row['standardised_difference'][0], 2)} |")
    lines += _background_section(r)
    if r.get("inpainting"):
        inp = r["inpainting"]
        lines += [
            "",
            "## Inpainting (repainted region = where the case differs from its source case)",
            "",
            f"{inp['cases']} case(s): mean share of voxels repainted {_f(inp['mean_changed_share'], 4)}; gradient "
            f"magnitude on the region's border, synthetic / source {_f(inp['mean_border_gradient_ratio'], 2)} "
            f"(1 = no seam); label fidelity inside the region (mean Dice) {_f(inp['mean_region_dice'])}.",
        ]
    lines += [
        "",
        "## Which cases each metric uses",
        "",
        CASES_USED,
        "## How the numbers are made",
        "",
        f"- Label fidelity: nnU-Net's predictor (test-time mirroring {'on' if fid['test_time_mirroring'] else 'off'}) "
        f"and nnU-Net's `compute_metrics`; validation Dice ({fid['validation']['cases']} cases): "
        f"{fid['validation'].get('source')}. Synthetic Dice above the validation Dice is a warning sign, not a "
        f"success: the model was trained on the training cases, so copies of them are easy to read (see "
        f"memorisation).",
        f"- Realism: {rea['feature_dims']} features per patch-sized tile (last convolution of every encoder stage, "
        f"global-average-pooled), tiles per set {rea['tiles']}, z-scored with the real tiles' statistics. "
        f"Covariances are regularised with {rea['covariance_regularisation_eps']:g}·I because there are fewer "
        f"tiles than features; compare the numbers with each other, not with published FIDs.",
        f"- Diversity: MONAI MS-SSIM on nnU-Net-preprocessed images mapped to [0, 1] with the real 0.5-99.5 "
        f"percentiles and cropped/padded to a common shape; settings {div['settings']}"
        + (" (per slice along the thinnest axis)." if div["settings"]["spatial_dims"] == 2 else "."),
        f"- Memorisation: {mem['distance']}.",
        "- Label statistics on the raw label maps (Wasserstein-1 between per-case distributions).",
    ]
    if r.get("background"):
        bfp, t = r["background"]["false_positives"], r["background"]["realism"]["background_tile_share_threshold"]
        lines.append(f"- Background: false positives from the same predictions as label fidelity, on the same grid "
                     f"(the cases' raw geometry); validation predictions: {bfp['validation']['predictions']}; "
                     f"training predictions: {bfp['training']['predictions']}. Tiles as for realism, z-scored with "
                     f"all real tiles; a tile is a background tile when at least {t:g} of its voxels (padding beyond "
                     f"the case excluded) are background in the case's label map.")
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in r["notes"]]
    lines += ["", "![montage](evaluation_montage.png)", ""]
    return "\n".join(lines)


def _background_rows(r: dict) -> list[str]:
    """The background's two rows of the summary table (none for a result written before they existed)."""
    if not r.get("background"):
        return []
    fp, rea = r["background"]["false_positives"], r["background"]["realism"]["background_tiles"]
    return [f"| background: share of background voxels the judge calls foreground (pooled) | "
            f"{_f(fp['synthetic']['pooled_share'], 4)} | {_f(fp['validation']['pooled_share'], 4)} (validation "
            f"cases) | synthetic close to real |",
            f"| background: Fréchet distance of mostly-background tiles to the validation cases | "
            f"{_f(rea['frechet_synthetic_vs_validation'], 2)} | {_f(rea['frechet_training_vs_validation'], 2)} "
            f"(training cases) | synthetic close to real |"]


def _background_section(r: dict) -> list[str]:
    if not r.get("background"):
        return []
    fp, rea = r["background"]["false_positives"], r["background"]["realism"]
    classes = list(fp["synthetic"]["per_class"])
    lines = [
        "",
        "## Background (voxels the label map leaves unlabelled)",
        "",
        "A synthesizer that sees only the label map paints the background from its prior; nnU-Net learns from "
        "every background voxel, so a wrong background teaches it wrong negatives. False positives: the share of "
        "a set's background voxels the judge calls some foreground class (pooled over the set's voxels; mean over "
        "cases), and to which class they go. The validation cases give the value a synthetic set with a realistic "
        "background should approach: far above it, the judge mistakes the synthetic background for structures; "
        "far below it, the background may be too easy to tell apart (e.g. no body). The training cases, seen by "
        "the judge, are a second real value.",
        "",
        "| set | cases | pooled share | mean over cases | " + " | ".join(f"to {_class(r, c)}" for c in classes) + " |",
        "|---|---|---|---|" + "---|" * len(classes),
    ]
    for name in ("synthetic", "validation", "training"):
        row = fp[name]
        lines.append(f"| {name} | {row['cases']} | {_f(row['pooled_share'], 4)} | {_f(row['mean_case_share'], 4)} | "
                     + " | ".join(_f(row["per_class"][c]["pooled_share"], 4) for c in classes) + " |")
    t = rea["background_tile_share_threshold"]
    lines += [
        "",
        f"Realism by tile content: the realism block's Fréchet distances within the tiles that are at least "
        f"{t:g} background (what the synthesizer paints as context) and within the others (the labelled "
        f"structures and what surrounds them). n/a: fewer than two tiles of a set in that group.",
        "",
        "| tiles | synthetic vs validation | training vs validation (reference) | tiles synthetic / training / "
        "validation |",
        "|---|---|---|---|",
    ]
    for name, title in (("background_tiles", f"background (≥ {t:g})"), ("content_tiles", "the others")):
        g = rea[name]
        lines.append(f"| {title} | {_f(g['frechet_synthetic_vs_validation'], 2)} | "
                     f"{_f(g['frechet_training_vs_validation'], 2)} | {g['tiles']['synthetic']} / "
                     f"{g['tiles']['training']} / {g['tiles']['validation']} |")
    return lines


def write_report(result: dict, folder: Path) -> None:
    atomic_write_json(folder / "evaluation.json", json_safe(result))
    atomic_write_text(folder / "evaluation.md", render_markdown(json_safe(result)))
