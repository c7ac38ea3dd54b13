"""The background of the cases: what the judge and its encoder see where the label map says "nothing labelled".

Why a separate look: on datasets that label 1-3 structures most voxels are background, and nnU-Net learns
from every one of them. A synthesizer conditioned on the label map alone paints that background from its
prior (noise, no body outline); wrong context there teaches the segmenter wrong negatives, and the
whole-case metrics barely show it. Two measures, per set (synthetic, training, validation):

- false positives on background: among the voxels a case's own label map marks background, the share the
  judge predicts as some foreground class, pooled over the set's voxels and as the mean over cases, and per
  class (which class the false positives go to). Made from the same prediction files label fidelity scores,
  on the same grid (the case's raw geometry). The validation cases are the reference: the judge's share on
  held-out real images is what a synthetic set whose background looks real should approach; a synthetic set
  far above it has backgrounds the judge mistakes for structures, one far below it may have backgrounds too
  easy to tell from the structures (e.g. no body). The training cases (seen by the judge) are a second real
  value, not necessarily lower (measured on the example: training 0.037, validation 0.035).
- realism by tile content: the encoder-feature tiles of the realism block, split by the share of background
  in each tile's label map (``BACKGROUND_TILE_SHARE``), each group with its own Fréchet distances.
"""
from __future__ import annotations

import numpy as np

from nnunet_diffaug.evaluation import realism

# A tile counts as a background tile when at least this share of its voxels (of the case, not of padding) is
# background. Why 0.9 and not 1: a tile is a whole nnU-Net patch, and in most cases nearly every patch touches
# some labelled voxels, so "all background" leaves too few tiles for a covariance; a tenth of labelled voxels
# moves the pooled encoder features little, so the group still measures how the background is painted.
BACKGROUND_TILE_SHARE = 0.9


def case_background_counts(label: np.ndarray, prediction: np.ndarray, foreground: list[int]) -> dict:
    """Counts of one case: background voxels (0) of ``label`` and how many of them ``prediction`` calls each
    foreground class. Voxels the label marks as anything else (a class, nnU-Net's ignore label) are not counted."""
    label, prediction = np.asarray(label), np.asarray(prediction)
    if label.shape != prediction.shape:
        raise ValueError(f"label {label.shape} and prediction {prediction.shape} are not on one grid")
    predicted = prediction[label == 0]
    per_class = {str(c): int((predicted == c).sum()) for c in foreground}
    return {"background_voxels": int(predicted.size), "false_positive_voxels": int(sum(per_class.values())),
            "per_class_voxels": per_class}


def share(counts: dict) -> float:
    """A case's false-positive share of its background voxels (NaN when it has none)."""
    n = counts["background_voxels"]
    return counts["false_positive_voxels"] / n if n else float("nan")


def summarise_false_positives(per_case: dict[str, dict], foreground: list[int]) -> dict:
    """Pooled over the set's background voxels, and the mean over cases, in total and per foreground class."""
    n = sum(c["background_voxels"] for c in per_case.values())
    with_background = [c for c in per_case.values() if c["background_voxels"]]

    def pooled(get):
        return sum(get(c) for c in per_case.values()) / n if n else float("nan")

    def case_mean(get):
        return float(np.mean([get(c) / c["background_voxels"] for c in with_background])) if with_background \
            else float("nan")
    return {
        "pooled_share": pooled(lambda c: c["false_positive_voxels"]),
        "mean_case_share": case_mean(lambda c: c["false_positive_voxels"]),
        "per_class": {str(k): {"pooled_share": pooled(lambda c, k=k: c["per_class_voxels"][str(k)]),
                               "mean_case_share": case_mean(lambda c, k=k: c["per_class_voxels"][str(k)])}
                      for k in foreground},
        "cases": len(per_case), "background_voxels": int(n),
    }


def split_by_content(features: np.ndarray, background_shares: np.ndarray,
                     threshold: float = BACKGROUND_TILE_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """(background tiles, content tiles): rows of ``features`` whose tile's background share is at least
    ``threshold``, and the rest."""
    background_shares = np.asarray(background_shares)
    if len(background_shares) != len(features):
        raise ValueError(f"{len(features)} feature rows but {len(background_shares)} tile shares")
    mask = background_shares >= threshold
    return features[mask], features[~mask]


def realism_by_content(features: dict[str, np.ndarray], background_shares: dict[str, np.ndarray],
                       eps: float = realism.DEFAULT_EPS, threshold: float = BACKGROUND_TILE_SHARE) -> dict:
    """The realism block's Fréchet distances within background tiles and within the other tiles.

    Features are z-scored with all real tiles (training and validation, both groups), as the whole-case
    realism does, so the two groups' numbers are in one feature space. A group with fewer than two tiles in a
    set has no covariance: its distances are NaN (null in the JSON)."""
    z = realism.standardiser(np.concatenate([features["training"], features["validation"]]))
    groups = {"background_tiles": {}, "content_tiles": {}}
    for k, f in features.items():
        groups["background_tiles"][k], groups["content_tiles"][k] = split_by_content(z(f), background_shares[k],
                                                                                     threshold)
    out = {"background_tile_share_threshold": threshold}
    for name, f in groups.items():
        out[name] = {**realism.frechet_table(f, eps), "tiles": {k: int(len(v)) for k, v in f.items()}}
    return out
