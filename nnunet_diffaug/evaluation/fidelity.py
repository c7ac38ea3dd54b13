"""Label fidelity: does a real-trained nnU-Net read the synthetic images' own labels back from them?

nnU-Net segments each synthetic image (its predictor, the fold's checkpoint); the predictions are
scored against the synthetic labels with nnU-Net's own evaluation (``compute_metrics``). The same
model's Dice on the fold's real validation cases is the ceiling to compare with: a synthetic set
whose images follow their labels as well as real images do scores about the same.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def case_dice(reference_file: str, prediction_file: str, reader_writer, labels: list[int]) -> dict[str, float]:
    """{label: Dice} of one case (NaN where the label is absent from both), by nnU-Net's evaluation."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    metrics = compute_metrics(str(reference_file), str(prediction_file), reader_writer, labels)["metrics"]
    return {str(k): float(v["Dice"]) for k, v in metrics.items()}


def summarise(per_case: dict[str, dict[str, float]], labels: list[int]) -> dict:
    """Mean Dice per label over cases (nanmean, as nnU-Net's summary.json) and their foreground mean."""
    means = {}
    for lab in labels:
        values = [d[str(lab)] for d in per_case.values() if not np.isnan(d[str(lab)])]
        means[str(lab)] = float(np.mean(values)) if values else float("nan")
    finite = [v for v in means.values() if not np.isnan(v)]
    return {"mean_dice_per_class": means, "foreground_mean_dice": float(np.mean(finite)) if finite else float("nan"),
            "cases": len(per_case)}


def validation_summary(model_folder: Path, fold: int) -> dict | None:
    """The model's own final validation (fold_F/validation/summary.json), as written by nnUNetv2_train."""
    path = Path(model_folder) / f"fold_{fold}" / "validation" / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    means = {str(k): float(v["Dice"]) for k, v in s["mean"].items()}
    per_case = {Path(c["prediction_file"]).name: {str(k): float(v["Dice"]) for k, v in c["metrics"].items()}
                for c in s["metric_per_case"]}
    return {"mean_dice_per_class": means, "foreground_mean_dice": float(s["foreground_mean"]["Dice"]),
            "cases": len(per_case), "source": str(path)}
