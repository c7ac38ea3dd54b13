"""Iteration time of nnUNetTrainerDiffAug against the stock nnUNetTrainer, same data, one process.

Both trainers are built from the same plans and fold, their data loaders started, and then timed
in alternating blocks of iterations (so drift in machine load hits both alike). Data loading runs
in the main process (nnUNet_n_proc_DA=0) so that its cost is part of the measured iteration.

    python benchmarks/bench_trainer_overhead.py                      # built-in example, small plans, CPU
    python benchmarks/bench_trainer_overhead.py -p nnUNetPlans -device cuda --blocks 10

Prints a JSON line with the median seconds per iteration of each trainer and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _prepare_example(workdir: Path) -> None:
    from support import EXAMPLE_ID, EXAMPLE_NAME, make_stand_in_synthetic_set, nnunet_env, run, write_splits
    from nnunet_diffaug.example_data import build_example_dataset
    from nnunet_diffaug.small_plans import write_small_plans
    env = nnunet_env(workdir)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    if not (workdir / "preprocessed" / EXAMPLE_NAME / "nnUNetPlansDiffAugSmall.json").is_file():
        build_example_dataset(workdir / "raw", EXAMPLE_ID, in_plane_size=64)
        run(["nnUNetv2_plan_and_preprocess", "-d", str(EXAMPLE_ID), "-c", "2d", "3d_fullres", "-np", "1",
             "-npfp", "1"], env)
        splits = write_splits(workdir / "preprocessed" / EXAMPLE_NAME, [f"chest_{i:03d}" for i in range(8)])
        write_small_plans(EXAMPLE_NAME)
        make_stand_in_synthetic_set(workdir / "raw", EXAMPLE_NAME, 0, splits[0]["train"], 8)


def _trainer(cls, dataset: str, configuration: str, plans_identifier: str, fold: int, device: str):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    folder = Path(str(nnUNet_preprocessed)) / dataset
    plans = load_json(str(folder / f"{plans_identifier}.json"))
    plans["continue_training"] = False  # nnU-Net 2.8's run_training injects this key
    trainer = cls(plans, configuration, fold, load_json(str(folder / "dataset.json")), torch.device(device))
    trainer.on_train_start()
    return trainer


def _time_block(trainer, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        trainer.train_step(next(trainer.dataloader_train))
    return (time.perf_counter() - start) / iterations


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", default=None, help="dataset (default: build the built-in example in a temp folder)")
    p.add_argument("-c", default="3d_fullres", help="configuration")
    p.add_argument("-p", default="nnUNetPlansDiffAugSmall", help="plans identifier")
    p.add_argument("-f", type=int, default=0, help="fold (needs a synthetic set for it)")
    p.add_argument("-device", default="cpu", help="cpu or cuda")
    p.add_argument("--ratio", type=float, default=0.5, help="synthetic share for the DiffAug trainer")
    p.add_argument("--blocks", type=int, default=8, help="alternating timing blocks per trainer")
    p.add_argument("--iterations", type=int, default=25, help="iterations per block")
    args = p.parse_args(argv)

    tmp = None
    if args.d is None:
        tmp = tempfile.TemporaryDirectory(prefix="diffaug_bench_")
        _prepare_example(Path(tmp.name))
        dataset = "Dataset990_ChestCTSlabs"
    else:
        from nnunet_diffaug.paths import resolve_dataset_name
        dataset = resolve_dataset_name(args.d)
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="diffaug_bench_results_")  # never the user's results
    os.environ["nnUNet_n_proc_DA"] = "0"  # only now: nnU-Net's planning crashes with 0
    os.environ["DIFFAUG_SYNTHETIC_RATIO"] = str(args.ratio)

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_diffaug.trainers.nnUNetTrainerDiffAug import nnUNetTrainerDiffAug
    stock = _trainer(nnUNetTrainer, dataset, args.c, args.p, args.f, args.device)
    diffaug = _trainer(nnUNetTrainerDiffAug, dataset, args.c, args.p, args.f, args.device)
    for t in (stock, diffaug):  # warm-up
        _time_block(t, 3)
    times = {"stock": [], "diffaug": []}
    for _ in range(args.blocks):
        times["stock"].append(_time_block(stock, args.iterations))
        times["diffaug"].append(_time_block(diffaug, args.iterations))
    import numpy as np
    result = {
        "dataset": dataset, "configuration": args.c, "plans": args.p, "device": args.device,
        "batch_size": stock.batch_size, "patch_size": list(stock.configuration_manager.patch_size),
        "ratio": args.ratio, "blocks": args.blocks, "iterations_per_block": args.iterations,
        "stock_s_per_iter": float(np.median(times["stock"])),
        "diffaug_s_per_iter": float(np.median(times["diffaug"])),
    }
    result["ratio_diffaug_over_stock"] = result["diffaug_s_per_iter"] / result["stock_s_per_iter"]
    print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
