"""The benchmark's report: per-arm Dice with the paired difference to stock, wall time, and a plot."""
from __future__ import annotations

import dataclasses
import datetime
import json
import re
from pathlib import Path

import numpy as np

from nnunet_diffaug.benchmark.workspace import (TIMINGS_FILE, TRAINING_STATS_FILE, fold_folder, read_json_or,
                                                summary_file)
from nnunet_diffaug.file_io import atomic_path, atomic_write_json, atomic_write_text
from nnunet_diffaug.raw_dataset import load_dataset_json
from nnunet_diffaug import env_vars
from nnunet_diffaug.trainers.budget import scaled_iterations


def _nnunet_log_wall_time(folder: Path, summary: Path) -> float | None:
    """Arms trained before the benchmark timed them: from the start stamp in the name of nnU-Net's training
    log to the validation summary; only for a run that was never resumed (one log)."""
    logs = list(folder.glob("training_log_*.txt"))
    m = re.match(r"training_log_(\d+)_(\d+)_(\d+)_(\d+)_(\d+)_(\d+)\.txt$", logs[0].name) if len(logs) == 1 else None
    if not m:
        return None
    start = datetime.datetime(*map(int, m.groups())).timestamp()
    return max(0.0, summary.stat().st_mtime - start)


def pooled_dice(summary: dict, labels: dict[str, str]) -> dict[str, float] | None:
    """Per class, Dice over all test cases at once (2 sum TP / (2 sum TP + sum FP + sum FN)), from nnU-Net's
    per-case counts; None for a summary without them.

    nnU-Net's per-case mean gives a case whose reference lacks a class Dice 0 for a few stray voxels and NaN
    (left out) for none: with a handful of test cases that alone moves a class by a third. On the built-in
    example one held-out slab has no right lung, and 3 to 25 stray voxels made the right lung 0.65 instead of
    0.98 in some runs, the largest part of the seed spread between arms."""
    cases = summary.get("metric_per_case") or []
    if not cases or any(not {"TP", "FP", "FN"} <= set(c["metrics"].get(k, {})) for c in cases for k in labels):
        return None
    out = {}
    for key, name in labels.items():
        tp, fp, fn = (sum(c["metrics"][key][m] for c in cases) for m in ("TP", "FP", "FN"))
        out[name] = float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else float("nan")
    return out


def collect_results(workdir: Path, s, folds: list[dict], arms) -> dict:
    labels = {str(v): k for k, v in load_dataset_json(workdir / "raw" / s.dataset)["labels"].items() if v != 0}
    timings = read_json_or(workdir / TIMINGS_FILE, {})
    budget_iterations = s.epochs * s.iterations
    runs = []
    for fold, f in enumerate(folds):
        for arm in arms:
            file = summary_file(workdir, arm, s.dataset, s.plans, s.configuration, fold)
            summary = json.loads(file.read_text())
            folder = fold_folder(workdir, arm, s.dataset, s.plans, s.configuration, fold)
            stats = read_json_or(folder / TRAINING_STATS_FILE, {})
            wall, source = timings.get(f"{arm.name}/fold_{fold}", {}).get("wall_time_s"), "benchmark"
            if wall is None:
                wall, source = _nnunet_log_wall_time(folder, file), "nnU-Net training log"
            iterations = stats.get("total_iterations")
            if stats.get("iterations_vs_stock") is not None:
                # the trainer's own ratio over the epochs it recorded: right also for a run resumed from a
                # checkpoint written before the statistics file existed (its earlier epochs are not recorded)
                iterations = stats["iterations_vs_stock"] * budget_iterations
            if iterations is None and env_vars.EQUAL_REAL_EXPOSURE not in dict(arm.env):
                # an arm that does not scale its iterations runs the budget; stock_x<PPP> runs it scaled
                scale = float(dict(arm.env).get(env_vars.ITERATION_SCALE, 1))
                iterations = s.epochs * scaled_iterations(s.iterations, scale)
            pooled = pooled_dice(summary, labels)
            pooled_mean = None if pooled is None else float(np.nanmean(list(pooled.values())))
            runs.append({"arm": arm.name, "trainer": arm.trainer, "fold": fold, "size": f["size"],
                         "n_train": f["n_train"], "seed": f["seed"], "train_cases": f["train"],
                         "dice": {labels[k]: float(v["Dice"]) for k, v in summary["mean"].items() if k in labels},
                         "mean_foreground_dice": float(summary["foreground_mean"]["Dice"]),
                         "pooled_dice": pooled,
                         "pooled_mean_foreground_dice": pooled_mean,
                         "wall_time_s": wall, "wall_time_source": None if wall is None else source,
                         "total_iterations": iterations, "training_stats": stats or None})
    return {"settings": dataclasses.asdict(s), "test_cases": folds[0]["val"] if folds else [],
            "arms": {a.name: a.to_json() for a in arms}, "classes": list(labels.values()), "runs": runs,
            "aggregate": aggregate(runs, [a.name for a in arms], {a.name: a.to_json() for a in arms})}


def _paired(rs: list[dict], stock: list[dict], value) -> tuple[float | None, float | None]:
    """Mean of (arm - stock) over the seeds both ran, and the paired t-test p (None with one seed or
    when every difference is the same, where t is undefined)."""
    from scipy import stats
    by_seed = {q["seed"]: value(q) for q in stock}
    pairs = [(value(r), by_seed[r["seed"]]) for r in rs if r["seed"] in by_seed]
    if not pairs:
        return None, None
    a, b = np.array(pairs).T
    diffs = a - b
    if len(diffs) < 2 or np.any(np.isnan(diffs)) or np.ptp(diffs) < 1e-12:
        return float(np.mean(diffs)), None
    return float(diffs.mean()), float(stats.ttest_rel(a, b).pvalue)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# Two readings of a run's Dice, whose aggregate fields differ by this prefix: nnU-Net's mean over the test cases
# ("", the run fields "dice" and "mean_foreground_dice") and Dice pooled over them ("pooled_", from
# ``pooled_dice``). Pooled Dice is the headline: with a handful of test cases the per-case mean swings with a
# few stray voxels on a case that lacks a class.
READINGS = ("pooled_", "")


def headline_reading(rows: list[dict]) -> str:
    """The pooled reading where every row has it (summaries written by nnU-Net do), else nnU-Net's per-case mean."""
    return "pooled_" if rows and all("pooled_mean_foreground_dice" in r for r in rows) else ""


def _has_reading(rs: list[dict], reading: str) -> bool:
    return bool(rs) and all(r.get(f"{reading}mean_foreground_dice") is not None and r.get(f"{reading}dice")
                            for r in rs)


def _reading_fields(rs: list[dict], stock: list[dict], reading: str) -> dict:
    """One reading's aggregate of an arm over its seeds and, given stock's runs (none for stock itself), its
    paired difference to stock, overall and per class."""
    def value(r):
        return r[f"{reading}mean_foreground_dice"]

    values = np.array([value(r) for r in rs])
    per_class = {c: np.array([r[f"{reading}dice"][c] for r in rs], dtype=float) for c in rs[0][f"{reading}dice"]}
    out = {f"{reading}mean_foreground_dice": float(values.mean()),
           f"{reading}sd": float(values.std(ddof=1)) if len(values) > 1 else None,  # one seed has no spread
           f"{reading}per_class_mean": {c: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan")
                                       for c, v in per_class.items()},
           f"{reading}per_class_sd": {c: float(np.nanstd(v, ddof=1)) if np.sum(~np.isnan(v)) > 1 else None
                                     for c, v in per_class.items()}}
    if _has_reading(stock, reading):
        out[f"{reading}difference_vs_stock"], out[f"{reading}paired_t_p_value"] = _paired(rs, stock, value)
        out[f"{reading}per_class_difference_vs_stock"] = {
            c: dict(zip(("difference", "paired_t_p_value"),
                        _paired(rs, stock, lambda r, c=c: r[f"{reading}dice"][c]))) for c in per_class}
    return out


def _paired_with(row: dict, partner_field: str, partner: str, fields: tuple[str, str],
                 rs: list[dict], partner_rs: list[dict]) -> None:
    """Names the partner arm in ``row`` and adds, per reading both arms have, the paired difference to it."""
    row[partner_field] = partner
    for reading in READINGS:
        if _has_reading(rs, reading) and _has_reading(partner_rs, reading):
            row[f"{reading}{fields[0]}"], row[f"{reading}{fields[1]}"] = _paired(
                rs, partner_rs, lambda r, reading=reading: r[f"{reading}mean_foreground_dice"])


def aggregate(runs: list[dict], arm_names: list[str], definitions: dict[str, dict] | None = None) -> list[dict]:
    """Per (size, arm), in each reading of Dice (``READINGS``): mean and sd over seeds and the paired difference to
    stock (p across seeds); and the cost. ``definitions`` (arm name -> ``Arm.to_json()``) lets each synthetic arm
    be paired with its deformed-real control as well."""
    rows = []
    for n_train in sorted({r["n_train"] for r in runs}):
        by_arm = {a: sorted((r for r in runs if r["arm"] == a and r["n_train"] == n_train), key=lambda r: r["seed"])
                  for a in arm_names}
        stock = by_arm["stock"]
        stock_iterations = _mean(q.get("total_iterations") for q in stock)
        for arm in arm_names:
            rs = by_arm[arm]
            if not rs:
                continue
            wall = _mean(r.get("wall_time_s") for r in rs)
            iterations = _mean(r.get("total_iterations") for r in rs)
            row = {"n_train": n_train, "arm": arm, "n_seeds": len(rs),
                   "wall_time_min": None if wall is None else wall / 60,
                   "iterations_vs_stock": (iterations / stock_iterations
                                           if iterations is not None and stock_iterations else None)}
            for reading in READINGS:
                if _has_reading(rs, reading):
                    row.update(_reading_fields(rs, stock if arm != "stock" else [], reading))
            rows.append(row)
        _add_equal_compute_differences([r for r in rows if r["n_train"] == n_train], by_arm)
        _add_control_differences([r for r in rows if r["n_train"] == n_train], by_arm, definitions or {})
    return rows


# iterations per epoch are whole numbers: stock_x150 runs round(1.5 x 25) = 38 where r = 1/3 with equal
# real exposure runs 37, so "as long" allows a few percent
EQUAL_COMPUTE_TOLERANCE = 0.05


def _add_equal_compute_differences(rows: list[dict], by_arm: dict[str, list[dict]]) -> None:
    """An arm that trains longer than stock (``_equalreal``) is also paired with the stock-trainer arm that
    trains as long (``stock_x<PPP>``), when the workspace has one: its gain over stock could otherwise be
    the extra compute alone."""
    if not by_arm["stock"]:
        return
    stock_trainer = by_arm["stock"][0].get("trainer")
    stock_like = [r for r in rows if r["arm"] != "stock" and r["iterations_vs_stock"]
                  and by_arm[r["arm"]][0].get("trainer") == stock_trainer]
    for row in rows:
        iters = row["iterations_vs_stock"]
        if row["arm"] == "stock" or row in stock_like or not iters or abs(iters - 1) < EQUAL_COMPUTE_TOLERANCE:
            continue
        match = min(stock_like, key=lambda s: abs(s["iterations_vs_stock"] - iters), default=None)
        if match is not None and abs(match["iterations_vs_stock"] - iters) / iters < EQUAL_COMPUTE_TOLERANCE:
            _paired_with(row, "equal_compute_stock_arm", match["arm"],
                         ("difference_vs_equal_compute_stock", "equal_compute_paired_t_p_value"),
                         by_arm[row["arm"]], by_arm[match["arm"]])


CONTROL_GENERATOR = "deformed-real"


def _add_control_differences(rows: list[dict], by_arm: dict[str, list[dict]], definitions: dict[str, dict]) -> None:
    """A synthetic arm is also paired with the deformed-real control that mixes the same way (same trainer and
    trainer settings), when the workspace has one: what the generator adds over deformed copies of the real
    cases, which is the question a diffusion model has to answer."""
    def generator(arm):
        return ((definitions.get(arm) or {}).get("synthetic") or {}).get("generator")

    def mixing(arm):
        return definitions[arm]["trainer"], definitions[arm]["env"]

    controls = [r["arm"] for r in rows if generator(r["arm"]) == CONTROL_GENERATOR]
    for row in rows:
        if generator(row["arm"]) in (None, CONTROL_GENERATOR):
            continue
        control = next((c for c in controls if mixing(c) == mixing(row["arm"])), None)
        if control is not None:
            _paired_with(row, "control_arm", control, ("difference_vs_control", "control_paired_t_p_value"),
                         by_arm[row["arm"]], by_arm[control])


def _mean_sd(mean: float, sd: float | None, one_seed: str = "") -> str:
    return f"{mean:.3f}" + (one_seed if sd is None else f" ± {sd:.3f}")


def _difference(delta: float | None, p: float | None, partner: str = "") -> str:
    """A table cell: the paired difference (to ``partner``, when named) and its p."""
    return "" if delta is None else f"{delta:+.3f}" + (f" vs {partner}" if partner else "") + (
        "" if p is None else f" (p {p:.3g})")


READING_NAMES = {"pooled_": "pooled over the held-out cases (2ΣTP / (2ΣTP + ΣFP + ΣFN) per class)",
                 "": "nnU-Net's per-case Dice, mean over the held-out cases"}


def format_table(results: dict) -> str:
    """Markdown: one row per (size, arm) in the headline reading of Dice, with its paired differences to stock,
    to stock trained as long and to the deformed-real control where the workspace has them, then nnU-Net's
    per-case mean (when the headline is pooled), wall time and compute; a last line says which reading it is."""
    rows, classes = results["aggregate"], results["classes"]
    h = headline_reading(rows)
    equal_compute = any("equal_compute_stock_arm" in row for row in rows)
    control = any("control_arm" in row for row in rows)
    head = ["n_train", "arm", "seeds", "fg Dice (± sd)", *classes, "Δ vs stock (p)",
            *(["Δ vs equal-compute stock (p)"] if equal_compute else []),
            *(["Δ vs deformed-real control (p)"] if control else []),
            *(["per-case fg Dice (± sd)", "per-case Δ vs stock (p)"] if h else []),
            "wall min", "iterations vs stock"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        wall, iters = row.get("wall_time_min"), row.get("iterations_vs_stock")
        class_sd = row.get(f"{h}per_class_sd", {})
        lines.append("| " + " | ".join([
            str(row["n_train"]), row["arm"], str(row.get("n_seeds", "")),
            _mean_sd(row[f"{h}mean_foreground_dice"], row[f"{h}sd"], " (1 seed)"),
            *[_mean_sd(row[f"{h}per_class_mean"][c], class_sd.get(c)) for c in classes],
            _difference(row.get(f"{h}difference_vs_stock"), row.get(f"{h}paired_t_p_value")),
            *([_partner_cell(row, h, "equal_compute_stock_arm", "difference_vs_equal_compute_stock",
                             "equal_compute_paired_t_p_value")] if equal_compute else []),
            *([_partner_cell(row, h, "control_arm", "difference_vs_control", "control_paired_t_p_value")]
              if control else []),
            *([_mean_sd(row["mean_foreground_dice"], row["sd"]),
               _difference(row.get("difference_vs_stock"), row.get("paired_t_p_value"))] if h else []),
            "" if wall is None else f"{wall:.1f}", "" if iters is None else f"{iters:.2f}×"]) + " |")
    lines.append("")
    lines.append(f"Dice: {READING_NAMES[h]}; mean and sd over seeds; Δ: mean paired difference over seeds, "
                 f"p: paired t-test.")
    if not results.get("settings", {}).get("mirroring", True):
        lines.append("Every arm trained and predicted without nnU-Net's mirroring (--no-mirroring).")
    return "\n".join(lines)


def _partner_cell(row: dict, reading: str, partner: str, difference: str, p_value: str) -> str:
    if partner not in row:
        return ""
    return _difference(row[f"{reading}{difference}"], row.get(f"{reading}{p_value}"), row[partner])


def _plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["aggregate"]
    h = headline_reading(rows)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    sizes = sorted({r["n_train"] for r in rows})
    if len(sizes) > 1:  # Dice against training-set size, one line per arm
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm in arms:
            rs = [r for r in rows if r["arm"] == arm]
            ax.errorbar([r["n_train"] for r in rs], [r[f"{h}mean_foreground_dice"] for r in rs],
                        yerr=[r[f"{h}sd"] or 0.0 for r in rs], marker="o", capsize=3, label=arm)
        ax.set_xlabel("real training cases")
    else:  # one size: grouped bars per class (and the foreground mean), one bar per arm, seed sd as error bar
        groups = ["mean fg", *results["classes"]]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(groups) * len(arms) + 2), 4))
        width = 0.8 / max(1, len(arms))
        for i, arm in enumerate(arms):
            r = next(r for r in rows if r["arm"] == arm)
            heights = [r[f"{h}mean_foreground_dice"], *[r[f"{h}per_class_mean"][c] for c in results["classes"]]]
            sds = [r[f"{h}sd"], *[r.get(f"{h}per_class_sd", {}).get(c) for c in results["classes"]]]
            x = np.arange(len(groups)) + (i - (len(arms) - 1) / 2) * width
            ax.bar(x, np.nan_to_num(heights), width, yerr=[sd or 0.0 for sd in sds], capsize=2,
                   label=f"{arm} ({r['n_seeds']} seed{'s' if r['n_seeds'] > 1 else ''})")
        ax.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"{sizes[0] if sizes else ''} real training cases; error bars: sd over seeds")
    ax.set_ylabel(("pooled " if h else "") + "Dice on held-out real cases")
    ax.set_title(f"{results['settings']['dataset']} {results['settings']['configuration']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_report(results: dict, workdir: Path) -> None:
    atomic_write_json(workdir / "benchmark_results.json", results)
    atomic_write_text(workdir / "benchmark_table.md", format_table(results) + "\n")
    _plot(results, workdir / "benchmark_plot.png")
