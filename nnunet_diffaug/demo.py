"""The end-to-end demo on the built-in example data: every step a user would run, in one command.

1. write the example dataset (real chest CT shipped by slicerio, 8 disjoint slabs) into the demo's
   own nnUNet_raw (the user's nnU-Net folders are not touched);
2. nnUNetv2_plan_and_preprocess;
3. the benchmark with one training-set size and one seed: train a synthesizer on the training
   cases, synthesize, train two nnU-Nets with the same seed and the same iterations (equal compute by
   construction: a gain of DiffAug cannot be extra training) and score them on the held-out real cases
   with nnU-Net's own evaluation: stock, and nnUNetTrainerDiffAug as it trains by default (calibrated
   synthetic cases, r = 1/3 of every batch), both without nnU-Net's mirroring, since the example's
   labels name sides;
4. print the comparison table (also written as Markdown, JSON and PNG into the demo folder).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from nnunet_diffaug.benchmark import BenchmarkSettings, format_table, headline_reading, run_benchmark
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.paths import console_script
from nnunet_diffaug.shared_cpu import set_shared_cpu_defaults

EXAMPLE_ID = 990


DEMO_PLANS = "nnUNetPlansDiffAugDemo"
# Stock against nnUNetTrainerDiffAug's defaults at the same budget: the equal-compute comparison in two runs (the
# three-run alternative, equal real exposure against stock_x150, costs twice the training and measured the same
# tie; docs/measured.md).
DEMO_ARMS = ("stock", "diffaug_r33_auto")
# The example's labels name a side (left/right lung): mirrored training and test-time averaging leave the side to
# the anatomy's asymmetry, which short 3d runs on a few slabs mostly do not learn (docs/measured.md, "Left or right").
DEMO_MIRRORING = False
# 2d by default: on 2 CPU cores it keeps the first run within about a quarter of an hour. The budget is that of
# the three-seed 2d measurement at 5 training slabs (2500 iterations; DiffAug at stock's budget +0.039, p 0.36: a
# tie; docs/measured.md), in fewer, longer epochs: nnU-Net spends about a second per epoch on plots and logs.
# (1200 iterations were tried: too few for nnU-Net to find the left lung in every run.)
DEMO_CONFIGURATION = "2d"
DEMO_EPOCHS, DEMO_ITERATIONS = 25, 100
NOISE_DICE = 0.05   # differences smaller than this, from one seed on a handful of test cases, are noise


def _verdict(difference: float) -> str:
    return "within the noise" if abs(difference) < NOISE_DICE else "larger than one seed's noise, but still one seed"


def explain_noise(results: dict) -> str:
    """What the demo's numbers mean: one seed and a few held-out cases cannot show a small effect."""
    h = headline_reading(results["aggregate"])
    n_test = len(results["test_cases"])
    seeds = sorted({r["seed"] for r in results["runs"]})
    reading = ("Dice pooled over the held-out cases, which a few stray voxels on a case that lacks a class cannot "
               "swing as they swing nnU-Net's per-case mean (also in the table)" if h else "nnU-Net's per-case Dice")
    lines = [f"How to read this: each row is one nnU-Net trained on the same {results['runs'][0]['n_train']} real "
             f"cases with the same budget, scored on {n_test} held-out real cases; 'fg Dice' is {reading}; "
             f"'Δ vs stock' = arm - stock.",
             f"With {len(seeds)} seed{'s' if len(seeds) > 1 else ''} and {n_test} test cases, differences below "
             f"about {NOISE_DICE:.2f} Dice are noise: another seed alone can move a short run's Dice by about that "
             f"much{', and a single seed gives no p-value' if len(seeds) == 1 else ''}."]
    for r in (r for r in results["aggregate"] if r.get(f"{h}difference_vs_stock") is not None):
        lines.append(f"  {r['arm']}: {r[f'{h}difference_vs_stock']:+.3f} ({_verdict(r[f'{h}difference_vs_stock'])})")
    for r in (r for r in results["aggregate"] if r.get(f"{h}difference_vs_equal_compute_stock") is not None):
        difference = r[f"{h}difference_vs_equal_compute_stock"]
        lines.append(f"  {r['arm']} vs {r['equal_compute_stock_arm']} (stock nnU-Net trained as long, the fair "
                     f"comparison): {difference:+.3f} ({_verdict(difference)})")
    lines.append("To measure it on your data, run several seeds (paired t-test across seeds) and longer training, "
                 "e.g.:\n  diffaug_benchmark -d <dataset> --arms diffaug_r33_auto deformed_real_r33 "
                 "--seeds 0 1 2 3 4 "
                 "--epochs 200\n(docs/benchmarking.md; rerunning the same workspace with more seeds trains only the "
                 "new ones).")
    return "\n".join(lines)


def run_demo(workdir: str | os.PathLike, device: str = "cpu", epochs: int = DEMO_EPOCHS,
             iterations: int = DEMO_ITERATIONS, n_synthetic: int = 16, verbose: bool = False,
             synthesizer_preset: str = "tiny", configuration: str = DEMO_CONFIGURATION) -> dict:
    from nnunet_diffaug.example_data import build_example_dataset
    workdir = Path(workdir).resolve()
    nnunet = workdir / "nnunet"
    env_paths = {"nnUNet_raw": nnunet / "nnUNet_raw", "nnUNet_preprocessed": nnunet / "nnUNet_preprocessed",
                 "nnUNet_results": nnunet / "nnUNet_results"}
    for k, v in env_paths.items():
        v.mkdir(parents=True, exist_ok=True)
        os.environ[k] = str(v)
    set_shared_cpu_defaults(os.environ)

    print(f"[1/3] Example dataset (chest CT from slicerio) -> {env_paths['nnUNet_raw']}")
    build_example_dataset(env_paths["nnUNet_raw"], EXAMPLE_ID, slab_slices=4, in_plane_size=64)
    plans = env_paths["nnUNet_preprocessed"] / f"Dataset{EXAMPLE_ID}_ChestCTSlabs" / "nnUNetPlans.json"
    if not (plans.parent / f"nnUNetPlans_{configuration}").is_dir():
        print("[2/3] nnUNetv2_plan_and_preprocess")
        cmd = [console_script("nnUNetv2_plan_and_preprocess"), "-d", str(EXAMPLE_ID),
               "-c", configuration, "-np", "1", "-npfp", "1", "--verify_dataset_integrity"]
        proc = subprocess.run(cmd, capture_output=not verbose, text=True)
        if proc.returncode != 0:
            raise DiffAugError(f"nnUNetv2_plan_and_preprocess failed:\n{(proc.stdout or '')[-3000:]}"
                               f"{(proc.stderr or '')[-3000:]}")
    dataset = f"Dataset{EXAMPLE_ID:03d}_ChestCTSlabs"
    plans_identifier = "nnUNetPlans"
    if device == "cpu":
        # a narrow network, but the whole 64 x 64 slice in view: with half of it a patch holding one lung
        # cannot tell the left lung from the right one
        from nnunet_diffaug.small_plans import write_small_plans
        if not (plans.parent / f"{DEMO_PLANS}.json").is_file():
            write_small_plans(dataset, "nnUNetPlans", DEMO_PLANS, max_patch=64)
        plans_identifier = DEMO_PLANS
    print("[3/3] Benchmark: synthesizer -> synthetic cases -> stock vs DiffAug nnU-Net -> held-out Dice")
    settings = BenchmarkSettings(
        dataset=dataset, configuration=configuration, plans=plans_identifier, train_sizes=("all",),
        seeds=(0,), test_fraction=0.375, epochs=epochs, iterations=iterations, val_iterations=2,
        n_synthetic=n_synthetic, device=device, synthesizer_preset=synthesizer_preset, arms=DEMO_ARMS,
        mirroring=DEMO_MIRRORING)
    results = run_benchmark(settings, workdir / f"benchmark_{configuration}", verbose=verbose)
    print()
    print(format_table(results))
    print()
    print(explain_noise(results))
    # this run's reading only: the record over several seeds lives in one place and changes there
    print("One seed on a few held-out slabs is a first look, not a measurement: the record over 3 seeds, with "
          "equal-compute and deformed-real controls and the exact commands, is docs/measured.md.")
    print("Trained and predicted without nnU-Net's mirroring, because the example's labels name a side (left and "
          "right lung). For such labels on your data: DIFFAUG_MIRRORING=0 for nnUNetv2_train and "
          "diffaug_benchmark --no-mirroring (docs/trainer.md).")
    print(f"\nTable, JSON and plot: {workdir / f'benchmark_{configuration}'} (benchmark_table.md, benchmark_results.json, "
          f"benchmark_plot.png)")
    return results
