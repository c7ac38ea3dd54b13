"""Stock nnUNetTrainer against nnUNetTrainerDiffAug on held-out real cases, at several training-set sizes.

For every (training-set size, seed) the benchmark draws ONE training subset from the real cases
outside a fixed held-out test set; both arms (and the synthesizer) see only that subset. Each
subset is a fold of the benchmark's own ``splits_final.json`` whose 'val' is the test set, so
nnU-Net's own final validation (predictor + evaluation, final checkpoint, no selection on the
test set) scores every arm on the same held-out cases.

Everything happens in a workspace folder: the user's raw and preprocessed data are linked, never
edited; synthesizers, synthetic sets and trained models live in the workspace. A finished arm
(its ``summary.json`` exists) is never retrained, so an interrupted benchmark resumes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from nnunet_diffaug import paths
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.rawdata import atomic_path, atomic_write_json, atomic_write_text, load_dataset_json

STOCK_TRAINER = "nnUNetTrainerBudget"      # the stock trainer, only its training length set
DIFFAUG_TRAINER = "nnUNetTrainerDiffAug"


@dataclasses.dataclass
class BenchmarkSettings:
    dataset: str                         # e.g. Dataset990_ChestCTSlabs (in the user's nnU-Net folders)
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    train_sizes: tuple = (2, 5, "all")
    seeds: tuple = (0, 1, 2)
    test_fraction: float = 0.3           # held-out real cases, fixed across sizes and seeds
    test_cases: tuple = ()               # or named explicitly
    epochs: int = 50
    iterations: int = 50
    val_iterations: int = 5
    ratios: tuple = (1 / 3,)             # DiffAug arms, one per synthetic share
    synthetic_only: bool = False         # add an r = 1 arm (seed (c)'s synthetic-only model)
    n_synthetic: int = 20
    synthesizer_preset: str = "tiny"
    sampler: str = "dpmpp"
    steps: int = 20
    device: str = "cpu"
    small_plans: bool = False            # write and use a small plans copy in the workspace (CPU runs)


# Settings that define what a finished arm IS: a workspace whose arms were trained under other values
# would mix budgets or synthesizers in one table, so such a rerun is refused (seeds and ratios may grow).
ARM_DEFINING_SETTINGS = ("dataset", "configuration", "plans", "epochs", "iterations", "val_iterations",
                         "n_synthetic", "synthesizer_preset", "sampler", "steps")


def check_same_arm_settings(settings_file: Path, s: BenchmarkSettings) -> None:
    if not settings_file.is_file():
        return
    before = json.loads(settings_file.read_text())
    now = dataclasses.asdict(s)
    changed = [f"{k} {before[k]!r} -> {now[k]!r}" for k in ARM_DEFINING_SETTINGS if k in before and before[k] != now[k]]
    if changed:
        raise DiffAugError(f"{settings_file.parent} holds arms trained with other settings ({'; '.join(changed)}): "
                           f"their results would be mixed into one table. Use a new workspace folder (-o).")


def _arm_names(s: BenchmarkSettings) -> list[tuple[str, float | None]]:
    arms = [("stock", None)] + [(f"diffaug_r{round(100 * r):d}", r) for r in s.ratios]
    if s.synthetic_only and all(abs(r - 1.0) > 1e-9 for r in s.ratios):
        arms.append(("diffaug_r100", 1.0))
    return arms


# ----------------------------------------------------------------------------------------------
# workspace and subsets
# ----------------------------------------------------------------------------------------------

def check_inputs(dataset: str, plans: str, user_raw: Path, user_preprocessed: Path) -> None:
    """Refuses before anything is written when the dataset is not planned and preprocessed."""
    if not (user_raw / dataset / "dataset.json").is_file():
        raise DiffAugError(f"{user_raw / dataset / 'dataset.json'} does not exist: {dataset} is not a raw dataset "
                           f"in nnUNet_raw.")
    plans_file = user_preprocessed / dataset / f"{plans}.json"
    if not plans_file.is_file():
        raise DiffAugError(f"{plans_file} does not exist. Run nnUNetv2_plan_and_preprocess -d {dataset} first.")


def make_workspace(workdir: Path, dataset: str, user_raw: Path, user_preprocessed: Path) -> None:
    """Links the user's raw and preprocessed dataset into the workspace (everything except the splits)."""
    raw_link = workdir / "raw" / dataset
    raw_link.parent.mkdir(parents=True, exist_ok=True)
    if not raw_link.exists():
        raw_link.symlink_to((user_raw / dataset).resolve(), target_is_directory=True)
    pre = workdir / "preprocessed" / dataset
    pre.mkdir(parents=True, exist_ok=True)
    for item in (user_preprocessed / dataset).iterdir():
        if item.name in ("splits_final.json", "diffaug_synthetic"):
            continue
        link = pre / item.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(item.resolve(), target_is_directory=item.is_dir())


def draw_subsets(cases: list[str], settings: BenchmarkSettings) -> tuple[list[str], list[dict]]:
    """The fixed test set and one training subset per (size, seed); the fold index is the list index."""
    cases = sorted(cases)
    if settings.test_cases:
        missing = sorted(set(settings.test_cases) - set(cases))
        if missing:
            raise DiffAugError(f"Test case(s) {missing} are not cases of {settings.dataset}.")
        test = sorted(settings.test_cases)
    else:
        n_test = max(1, int(round(settings.test_fraction * len(cases))))
        test = sorted(np.random.default_rng(12345).choice(cases, n_test, replace=False).tolist())
    pool = [c for c in cases if c not in test]
    sizes = [(size, len(pool) if size == "all" else int(size)) for size in settings.train_sizes]
    for size, n in sizes:
        if not 1 <= n <= len(pool):
            raise DiffAugError(f"Training-set size {size} is impossible: {len(pool)} real cases remain outside "
                               f"the {len(test)} held-out test cases.")
    folds = []
    # seed-major order: rerunning a finished benchmark with more seeds only appends folds, so nothing is retrained
    for seed in settings.seeds:
        for size, n in sizes:
            rng = np.random.default_rng([int(seed), n])
            subset = sorted(rng.choice(pool, n, replace=False).tolist())
            folds.append({"size": size, "n_train": n, "seed": int(seed), "train": subset, "val": test})
    return test, folds


# ----------------------------------------------------------------------------------------------
# running the steps (each a console script, as a user would run it)
# ----------------------------------------------------------------------------------------------

class _Runner:
    def __init__(self, workdir: Path, settings: BenchmarkSettings, verbose: bool):
        self.workdir = workdir
        self.s = settings
        self.verbose = verbose
        self.log = workdir / "benchmark_log.txt"

    def env(self, results: str, **extra) -> dict:
        from nnunet_diffaug.cli import ensure_trainer_discoverable
        env = dict(os.environ)
        env.update({"nnUNet_raw": str(self.workdir / "raw"), "nnUNet_preprocessed": str(self.workdir / "preprocessed"),
                    "nnUNet_results": str(self.workdir / "results" / results),
                    "nnUNet_extTrainer": ensure_trainer_discoverable()})
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def __call__(self, cmd: list[str], env: dict) -> None:
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.run(cmd, env=env, stdout=None if self.verbose else log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise DiffAugError(f"'{' '.join(cmd)}' failed (exit {proc.returncode}); see {self.log}.")


def _script(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _summary_file(workdir: Path, arm: str, dataset: str, trainer: str, plans: str, configuration: str,
                  fold: int) -> Path:
    return (workdir / "results" / arm / dataset / f"{trainer}__{plans}__{configuration}" / f"fold_{fold}" /
            "validation" / "summary.json")


def _train_synthesizer_and_synthesize(run: _Runner, fold: int, seed: int) -> None:
    s = run.s
    env = run.env("synthesizer")
    common = ["-d", s.dataset, "-f", str(fold), "-c", s.configuration, "-device", s.device, "--seed", str(seed)]
    run([_script("diffaug_train_synthesizer"), *common, "-p", s.synthesizer_preset, "-plans", s.plans], env)
    run([_script("diffaug_synthesize"), *common, "-n", str(s.n_synthetic), "--labels", "real",
         "--sampler", s.sampler, "--steps", str(s.steps)], env)


def _train_arm(run: _Runner, arm: str, ratio: float | None, fold: int, seed: int) -> None:
    s = run.s
    budget = {"DIFFAUG_NUM_EPOCHS": s.epochs, "DIFFAUG_ITERATIONS_PER_EPOCH": s.iterations,
              "DIFFAUG_VAL_ITERATIONS": s.val_iterations, "DIFFAUG_SEED": seed}
    if ratio is not None:
        budget["DIFFAUG_SYNTHETIC_RATIO"] = ratio
    trainer = STOCK_TRAINER if ratio is None else DIFFAUG_TRAINER
    env = run.env(arm, **budget)
    # a killed run leaves checkpoint_latest.pth: --c continues it instead of starting over
    run([_script("nnUNetv2_train"), s.dataset, s.configuration, str(fold), "-tr", trainer, "-p", s.plans,
         "-device", s.device, "--c"], env)


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------

def run_benchmark(settings: BenchmarkSettings, workdir: str | os.PathLike, verbose: bool = False) -> dict:
    from tqdm import tqdm
    s = settings
    check_inputs(s.dataset, s.plans, paths.nnunet_raw(), paths.nnunet_preprocessed())
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    make_workspace(workdir, s.dataset, paths.nnunet_raw(), paths.nnunet_preprocessed())
    pre = workdir / "preprocessed" / s.dataset
    if s.small_plans:
        from nnunet_diffaug.small_plans import write_small_plans
        small = pre / "nnUNetPlansDiffAugSmall.json"
        if not small.is_file():
            old = os.environ.get("nnUNet_preprocessed")
            os.environ["nnUNet_preprocessed"] = str(workdir / "preprocessed")
            try:
                write_small_plans(s.dataset, s.plans, "nnUNetPlansDiffAugSmall")
            finally:
                os.environ["nnUNet_preprocessed"] = old
        s = dataclasses.replace(s, plans="nnUNetPlansDiffAugSmall")
    if not (pre / f"{s.plans}.json").is_file():
        raise DiffAugError(f"{pre / (s.plans + '.json')} does not exist: plan and preprocess {s.dataset} first.")
    check_same_arm_settings(workdir / "benchmark_settings.json", s)

    from nnunet_diffaug.rawdata import list_cases
    cases = sorted(list_cases(workdir / "raw" / s.dataset, load_dataset_json(workdir / "raw" / s.dataset)))
    test, folds = draw_subsets(cases, s)
    splits_file = pre / "splits_final.json"
    splits = [{"train": f["train"], "val": f["val"]} for f in folds]
    if splits_file.is_file():
        existing = json.loads(splits_file.read_text())
        shared = min(len(existing), len(splits))
        # one a prefix of the other is the same benchmark with more (or, to report, fewer leading) seeds
        if existing[:shared] != splits[:shared]:
            raise DiffAugError(f"{splits_file} holds different subsets (other sizes, test set or seed order?). "
                               f"Add seeds at the end of --seeds, or use a new workspace folder.")
        splits = max(existing, splits, key=len)  # never drop folds another run may be training
    atomic_write_json(splits_file, splits)
    atomic_write_json(workdir / "benchmark_settings.json", dataclasses.asdict(s))

    run = _Runner(workdir, s, verbose)
    arms = _arm_names(s)
    steps = [(fold, arm, ratio) for fold in range(len(folds)) for arm, ratio in arms]
    for fold, arm, ratio in tqdm(steps, desc="Benchmark arms", unit="arm"):
        f = folds[fold]
        trainer = STOCK_TRAINER if ratio is None else DIFFAUG_TRAINER
        if _summary_file(workdir, arm, s.dataset, trainer, s.plans, s.configuration, fold).is_file():
            continue  # finished arms are never retrained
        if ratio is not None:
            _train_synthesizer_and_synthesize(run, fold, f["seed"])  # both resume by themselves
        _train_arm(run, arm, ratio, fold, f["seed"])

    results = collect_results(workdir, s, folds, arms)
    write_report(results, workdir)
    return results


def collect_results(workdir: Path, s: BenchmarkSettings, folds: list[dict], arms) -> dict:
    labels = {str(v): k for k, v in load_dataset_json(workdir / "raw" / s.dataset)["labels"].items() if v != 0}
    runs = []
    for fold, f in enumerate(folds):
        for arm, ratio in arms:
            trainer = STOCK_TRAINER if ratio is None else DIFFAUG_TRAINER
            summary = json.loads(_summary_file(workdir, arm, s.dataset, trainer, s.plans, s.configuration,
                                               fold).read_text())
            per_class = {labels[k]: float(v["Dice"]) for k, v in summary["mean"].items() if k in labels}
            runs.append({"arm": arm, "ratio": ratio, "fold": fold, "size": f["size"], "n_train": f["n_train"],
                         "seed": f["seed"], "train_cases": f["train"], "dice": per_class,
                         "mean_foreground_dice": float(summary["foreground_mean"]["Dice"])})
    return {"settings": dataclasses.asdict(s), "test_cases": folds[0]["val"] if folds else [],
            "classes": list(labels.values()), "runs": runs, "aggregate": aggregate(runs, [a for a, _ in arms])}


def aggregate(runs: list[dict], arm_names: list[str]) -> list[dict]:
    """Mean +- sd over seeds per (size, arm), and DiffAug - stock with a paired t-test across seeds."""
    from scipy import stats
    rows = []
    for n_train in sorted({r["n_train"] for r in runs}):
        by_arm = {a: sorted((r for r in runs if r["arm"] == a and r["n_train"] == n_train), key=lambda r: r["seed"])
                  for a in arm_names}
        stock = by_arm["stock"]
        for arm in arm_names:
            rs = by_arm[arm]
            values = np.array([r["mean_foreground_dice"] for r in rs])
            row = {"n_train": n_train, "arm": arm, "n_seeds": len(rs),
                   "mean_foreground_dice": float(values.mean()),
                   "sd": float(values.std(ddof=1)) if len(values) > 1 else None,  # one seed has no spread
                   "per_class_mean": {c: float(np.nanmean([r["dice"][c] for r in rs])) for c in rs[0]["dice"]}}
            if arm != "stock":
                paired = [(r["mean_foreground_dice"], q["mean_foreground_dice"])
                          for r in rs for q in stock if q["seed"] == r["seed"]]
                diffs = np.array([a - b for a, b in paired])
                row["difference_vs_stock"] = float(diffs.mean())
                row["paired_t_p_value"] = (float(stats.ttest_rel([a for a, _ in paired], [b for _, b in paired]).pvalue)
                                           if len(diffs) > 1 and np.any(diffs != diffs[0]) else None)
            rows.append(row)
    return rows


def format_table(results: dict) -> str:
    classes = results["classes"]
    head = ["n_train", "arm", "mean fg Dice (± sd)", *classes, "Δ vs stock", "paired p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["aggregate"]:
        delta = row.get("difference_vs_stock")
        p = row.get("paired_t_p_value")
        lines.append("| " + " | ".join([
            str(row["n_train"]), row["arm"], f"{row['mean_foreground_dice']:.3f} " + (
                "(1 seed)" if row["sd"] is None else f"± {row['sd']:.3f}"),
            *[f"{row['per_class_mean'][c]:.3f}" for c in classes],
            "" if delta is None else f"{delta:+.3f}", "" if p is None else f"{p:.3g}"]) + " |")
    return "\n".join(lines)


def write_report(results: dict, workdir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    atomic_write_json(workdir / "benchmark_results.json", results)
    atomic_write_text(workdir / "benchmark_table.md", format_table(results) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in dict.fromkeys(r["arm"] for r in results["aggregate"]):
        rows = [r for r in results["aggregate"] if r["arm"] == arm]
        ax.errorbar([r["n_train"] for r in rows], [r["mean_foreground_dice"] for r in rows],
                    yerr=[r["sd"] or 0.0 for r in rows], marker="o", capsize=3, label=arm)
    ax.set_xlabel("real training cases")
    ax.set_ylabel("mean foreground Dice on held-out real cases")
    ax.set_title(f"{results['settings']['dataset']} {results['settings']['configuration']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(workdir / "benchmark_plot.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
