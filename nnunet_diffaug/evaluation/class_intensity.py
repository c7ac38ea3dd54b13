"""Per-class intensity: is each structure painted with the intensities it has in real images?

Label fidelity needs a judge that segments every class, and a judge trained on a few cases often
misses small structures; Fréchet distance is one number for the whole image. This metric needs no
model: in nnU-Net's preprocessed space (normalised intensities), the mean intensity of each class
in each case, synthetic vs real. A structure painted like its surroundings (thin bone painted as
soft tissue) shows up as a class whose synthetic mean sits far from the real one, measured in
units of the real between-case spread.
"""
from __future__ import annotations

import numpy as np


def case_class_means(data: np.ndarray, seg: np.ndarray, classes: list[int]) -> dict[int, list[float]]:
    """{class: [mean intensity per channel]} of one case ((C, *spatial) data, (1, *spatial) labels);
    classes absent from the case are left out."""
    out = {}
    for c in classes:
        mask = seg[0] == c
        if mask.any():
            out[c] = [float(channel[mask].mean()) for channel in data]
    return out


def class_intensity_report(means: dict[str, list[dict]], classes: list[int]) -> dict:
    """``means``: {'synthetic', 'training', 'validation'} -> per-case dicts from ``case_class_means``.

    Per class and channel: the mean over cases of each set, and the standardised difference
    |synthetic - real| / sd(real) with the training and validation cases together as the real set
    (a synthesizer is meant to paint like both). ``worst_standardised_difference`` is the class the
    synthesizer paints least like the real one."""
    per_class, worst = {}, (None, -1.0)
    for c in classes:
        columns = {k: np.array([m[c] for m in v if c in m]) for k, v in means.items()}
        if len(columns["synthetic"]) == 0 or len(columns["training"]) + len(columns["validation"]) == 0:
            continue
        real = np.concatenate([columns[k] for k in ("training", "validation") if len(columns[k])])
        real_sd = real.std(axis=0, ddof=1) if len(real) > 1 else np.zeros(real.shape[1])
        real_mean, synthetic_mean = real.mean(axis=0), columns["synthetic"].mean(axis=0)
        # a floor on the spread: a class with near-identical real cases must not turn tiny gaps into huge scores
        scale = np.maximum(real_sd, 0.05 * np.abs(real).mean(axis=0) + 1e-3)
        standardised = np.abs(synthetic_mean - real_mean) / scale
        per_class[str(c)] = {
            "mean": {k: columns[k].mean(axis=0).tolist() for k in columns if len(columns[k])},
            "real_mean": real_mean.tolist(), "real_sd": real_sd.tolist(),
            "standardised_difference": standardised.tolist(),
            "cases_with_class": {k: int(len(columns[k])) for k in columns},
        }
        if float(standardised.max()) > worst[1]:
            worst = (str(c), float(standardised.max()))
    return {"per_class": per_class, "worst_class": worst[0], "worst_standardised_difference": worst[1]
            if worst[0] is not None else float("nan")}
