"""Left or right: how the models of a benchmark workspace assign sides, and its Dice with each side pair merged.

    python benchmarks/side_confusion.py WORKSPACE [ARM ...] [--all-pairs]

For labels that differ only in "left"/"right" (``right_lung`` and ``left_lung``), nnU-Net's mirroring makes the
side hard to learn from few cases. Per arm and seed (fold) this prints, from the held-out predictions that
nnU-Net's final validation wrote: the share of the pair's voxels found in both reference and prediction that got
the correct side (1.0: always right, 0.5: a coin flip), the pair's pooled Dice with both sides merged, and the
pooled foreground Dice over the classes with every pair merged, with the paired difference of each arm to stock
(paired t-test over seeds; ``--all-pairs``: between every two arms). Reads the workspace only.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from scipy.stats import ttest_rel

from nnunet_diffaug.trainers.mirroring import side_pairs


def groups_with_pairs_merged(labels: dict[str, int]) -> dict[str, tuple[int, ...]]:
    pairs = side_pairs(labels)
    in_pair = {name for pair in pairs for name in pair}
    groups = {f"{left}+{right}": (labels[left], labels[right]) for left, right in pairs}
    groups.update({name: (value,) for name, value in labels.items() if value != 0 and name not in in_pair})
    return groups


def score_fold(validation: Path, reference: Path, ending: str, reader, labels: dict[str, int]) -> dict:
    groups = groups_with_pairs_merged(labels)
    counts = {g: np.zeros(3) for g in groups}                      # TP, FP, FN per merged group
    sides = {pair: np.zeros(2) for pair in side_pairs(labels)}     # correct side, found
    for prediction_file in sorted(validation.glob(f"*{ending}")):
        prediction = reader.read_seg(str(prediction_file))[0][0]
        truth = reader.read_seg(str(reference / prediction_file.name))[0][0]
        for group, values in groups.items():
            p, t = np.isin(prediction, values), np.isin(truth, values)
            counts[group] += [(p & t).sum(), (p & ~t).sum(), (~p & t).sum()]
        for (left, right), tally in sides.items():
            found = np.isin(prediction, (labels[left], labels[right])) & np.isin(truth, (labels[left], labels[right]))
            tally += [(found & (prediction == truth)).sum(), found.sum()]
    dice = {g: 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan") for g, (tp, fp, fn) in counts.items()}
    return {"dice": dice, "foreground": float(np.nanmean(list(dice.values()))),
            "correct_side": {f"{left}+{right}": ok / found if found else float("nan")
                             for (left, right), (ok, found) in sides.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workspace", type=Path)
    parser.add_argument("arms", nargs="*", help="default: every arm the workspace recorded")
    parser.add_argument("--all-pairs", action="store_true", help="paired differences between every two arms")
    args = parser.parse_args()
    settings = json.loads((args.workspace / "benchmark_settings.json").read_text())
    arms = args.arms or list(json.loads((args.workspace / "benchmark_arms.json").read_text()))
    raw = args.workspace / "raw" / settings["dataset"]
    dataset_json = json.loads((raw / "dataset.json").read_text())
    labels, ending = dataset_json["labels"], dataset_json["file_ending"]
    if not side_pairs(labels):
        raise SystemExit(f"{raw / 'dataset.json'}: no pair of labels differs only in left/right.")
    reader = determine_reader_writer_from_dataset_json(dataset_json, next((raw / "labelsTr").glob(f"*{ending}")))()
    scores = {}
    for arm in arms:
        for validation in sorted((args.workspace / "results" / arm / settings["dataset"]).glob(
                f"*__{settings['plans']}__{settings['configuration']}/fold_*/validation")):
            if (validation / "summary.json").is_file():
                fold = int(validation.parent.name.split("_")[1])
                scores.setdefault(arm, {})[fold] = score_fold(validation, raw / "labelsTr", ending, reader, labels)
    for arm, by_fold in scores.items():
        folds = sorted(by_fold)
        fg = [by_fold[f]["foreground"] for f in folds]
        sides = "; ".join(f"{pair} correct side " + " ".join(f"{by_fold[f]['correct_side'][pair]:.2f}" for f in folds)
                          + f", merged Dice {np.mean([by_fold[f]['dice'][pair] for f in folds]):.3f}"
                          for pair in by_fold[folds[0]]["correct_side"])
        spread = f" ± {np.std(fg, ddof=1):.3f}" if len(fg) > 1 else ""
        print(f"{arm}: foreground Dice, side pairs merged {np.mean(fg):.3f}{spread} "
              f"(seeds {', '.join(f'{v:.3f}' for v in fg)}) | {sides}")
    pairs = itertools.combinations(scores, 2) if args.all_pairs else [("stock", a) for a in scores if a != "stock"]
    for first, second in pairs:
        common = sorted(set(scores.get(first, {})) & set(scores.get(second, {})))
        if len(common) < 2:
            continue
        x = np.array([scores[second][f]["foreground"] for f in common])
        y = np.array([scores[first][f]["foreground"] for f in common])
        print(f"{second} - {first}: {np.mean(x - y):+.3f} (p {ttest_rel(x, y).pvalue:.2f}; per seed "
              + " ".join(f"{d:+.3f}" for d in x - y) + ")")


if __name__ == "__main__":
    main()
