"""Per-step cost of the segmentation-consistency loss: diffusion steps/s of the same synthesizer config with the
loss off and on, on the built-in example, one process.

Prepares the example (8 slabs of 4 slices, 64x64 in-plane; small plans), trains a stand-in judge with
nnUNetv2_train (nnUNetTrainerBudget, a short budget: its quality does not change the cost) and one autoencoder,
then trains the diffusion stage in alternating blocks (off, on at each --max-timestep, off, ...) from the same
autoencoder, so drift in machine load hits every arm alike. Only the diffusion step function is timed (the
judge's loading and the latent scale factor are not), the first two steps of each block left out.

    python benchmarks/bench_consistency_cost.py -c 3d_fullres
    python benchmarks/bench_consistency_cost.py -c 2d --blocks 6 --steps 40

Prints one JSON line: mean (and median) seconds per step and steps/s of each arm, and each arm's mean time
relative to off.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

JUDGE_TRAINER, PLANS = "nnUNetTrainerBudget", "nnUNetPlansDiffAugSmall"


def _prepare(workdir: Path, configuration: str) -> Path:
    """The planned example and a judge of fold 0; returns the judge's model folder."""
    from support import EXAMPLE_ID, EXAMPLE_NAME, console_script, nnunet_env, run, write_splits
    from nnunet_diffaug.example_data import build_example_dataset
    from nnunet_diffaug.small_plans import write_small_plans
    env = nnunet_env(workdir)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    if not (workdir / "preprocessed" / EXAMPLE_NAME / f"{PLANS}.json").is_file():
        build_example_dataset(workdir / "raw", EXAMPLE_ID, slab_slices=4, in_plane_size=64)
        run([console_script("nnUNetv2_plan_and_preprocess"), "-d", str(EXAMPLE_ID), "-c", "2d", "3d_fullres",
             "-np", "1", "-npfp", "1"], env)
        write_splits(workdir / "preprocessed" / EXAMPLE_NAME, [f"chest_{i:03d}" for i in range(8)])
        write_small_plans(EXAMPLE_NAME)
    judge = workdir / "results" / EXAMPLE_NAME / f"{JUDGE_TRAINER}__{PLANS}__{configuration}"
    if not (judge / "fold_0" / "checkpoint_final.pth").is_file():
        budget = {"DIFFAUG_NUM_EPOCHS": 2, "DIFFAUG_ITERATIONS_PER_EPOCH": 10, "DIFFAUG_VAL_ITERATIONS": 1,
                  "DIFFAUG_SEED": 0, "nnUNet_n_proc_DA": 0}
        run([console_script("nnUNetv2_train"), EXAMPLE_NAME, configuration, "0", "-tr", JUDGE_TRAINER, "-p", PLANS,
             "-device", "cpu"], nnunet_env(workdir, **budget))
    return judge


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", default="3d_fullres", choices=("2d", "3d_fullres"), help="configuration (default 3d_fullres)")
    p.add_argument("--preset", default="tiny", help="synthesizer preset (default tiny)")
    p.add_argument("--steps", type=int, default=30, help="diffusion steps per block (default 30)")
    p.add_argument("--blocks", type=int, default=4, help="blocks per arm, each with its own seed (default 4)")
    p.add_argument("--max-timestep", type=float, nargs="+", default=[200, 1000],
                   help="the loss's max_timestep of each 'on' arm (default 200 1000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--workdir", default=None, help="nnU-Net folders to (re)use (default: a temporary folder)")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    from support import EXAMPLE_ID, EXAMPLE_NAME
    from nnunet_diffaug.paths import synthesizer_folder
    from nnunet_diffaug.synthesis import training
    from nnunet_diffaug.synthesis.checkpoint import read_state
    from nnunet_diffaug.synthesis.config import SynthesizerConfig, load_config

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_consistency_"))
    judge = _prepare(workdir, args.c)
    base = load_config(args.preset).to_json()
    base["diffusion"]["steps"] = args.steps
    base["diffusion"]["scale_factor_batches"] = 2
    base["checkpoint_every"] = 10 ** 6
    base["autoencoder"]["steps"] = 20  # the autoencoder's quality does not change the diffusion step's cost

    times: list[float] = []
    stage_runner = training.run_stage

    def timed_run_stage(stage, folder, total, every, modules, optimizers, step_fn, *rest, **kwargs):
        def step(i):
            start = time.perf_counter()
            out = step_fn(i)
            if stage == "diffusion":
                times.append(time.perf_counter() - start)
            return out
        return stage_runner(stage, folder, total, every, modules, optimizers, step, *rest, **kwargs)

    training.run_stage = timed_run_stage
    arms = {"off": None, **{f"on_t{m:g}": m for m in args.max_timestep}}
    per_arm: dict[str, list[float]] = {name: [] for name in arms}
    applied: dict[str, list[bool]] = {name: [] for name in arms}
    autoencoder = None
    for block in range(args.blocks):
        for name, max_timestep in arms.items():
            config = json.loads(json.dumps(base))
            if max_timestep is not None:
                config["consistency"] = {"judge": str(judge), "weight": 1.0, "max_timestep": max_timestep}
            results = workdir / f"results_{name}_{block}"
            shutil.rmtree(results, ignore_errors=True)
            shutil.copytree(workdir / "results", results)
            os.environ["nnUNet_results"] = str(results)
            folder = synthesizer_folder(EXAMPLE_NAME, args.c, 0)
            if autoencoder is not None:  # every block starts from the same autoencoder
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy(autoencoder, folder / "autoencoder.safetensors")
            times.clear()
            # every block its own seed (the arms of a block the same): at a low max_timestep the share of steps
            # with a qualifying sample follows the timestep draws
            training.train_synthesizer(EXAMPLE_ID, args.c, 0, SynthesizerConfig.from_json(config),
                                       plans_identifier=PLANS, device="cpu", seed=block, progress=False)
            per_arm[name] += times[2:]
            measured = read_state(folder / "diffusion.safetensors")["losses"].get("consistency", [])[2:]
            applied[name] += [v is not None for v in measured]
            if autoencoder is None:
                autoencoder = workdir / f"autoencoder_{args.c}.safetensors"
                shutil.copy(folder / "autoencoder.safetensors", autoencoder)
            shutil.rmtree(results, ignore_errors=True)
    # the mean: what training time adds up to (at a low max_timestep many steps select no sample and cost as
    # much as without the loss, so the median would hide the others)
    off = statistics.mean(per_arm["off"])
    out = {"configuration": args.c, "preset": args.preset, "threads": args.threads, "steps_per_block": args.steps,
           "blocks": args.blocks}
    for name, values in per_arm.items():
        mean = statistics.mean(values)
        out[name] = {"mean_s_per_step": round(mean, 4), "steps_per_s": round(1 / mean, 2),
                     "relative_to_off": round(mean / off, 2), "median_s_per_step": round(statistics.median(values), 4),
                     "share_of_steps_with_the_loss": round(statistics.mean(applied[name]), 2) if applied[name] else 0.0}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
