"""Sampling speed and peak memory of the label-conditioned synthesizer: seconds per case against steps.

Times label map -> image (reverse diffusion + decoding + clamping) for 2D and 3D sizes, with a
model built from a preset (weights do not change the cost) or loaded from a trained synthesizer.
Each (dims, size) runs in its own process so its peak memory is its own.

    python benchmarks/bench_sampling.py                         # tiny preset, CPU, 2 threads
    python benchmarks/bench_sampling.py --device cuda --preset default --sizes3d 64 128 --sizes2d 256 512

Goals: <= 2 s per 32^3 case with the tiny preset on 2 CPU cores; >= 1 case/s at 128^3 on one H100.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _one(args) -> dict:
    """Runs in the child: times every step count for one (dims, size)."""
    import resource

    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    from nnunet_diffaug.synthesis.config import load_config
    from nnunet_diffaug.synthesis.data import DataSpec
    from nnunet_diffaug.synthesis.synthesizer import Synthesizer

    device = torch.device(args.device)
    cfg = load_config(args.preset)
    dims, size = args.dims, args.size
    patch = list(cfg.data.patch_size_3d if dims == 3 else cfg.data.patch_size_2d)
    spec = DataSpec(dataset_name="bench", configuration="3d_fullres" if dims == 3 else "2d",
                    plans_identifier="nnUNetPlans", fold=0, training_cases=[], spatial_dims=dims, in_channels=1,
                    label_values=list(range(6)), normalization_schemes=["CTNormalization"],
                    intensity_min=[-2.0], intensity_max=[2.0], patch_size=patch)
    syn = Synthesizer(cfg, spec, device)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=(1,) + (size,) * dims).astype(np.int64)
    rows = []
    for steps in args.steps:
        sampler = syn.sampler(args.sampler, steps)
        gen = torch.Generator().manual_seed(0)
        syn.generate(labels, sampler, gen)  # warm-up (allocator, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            syn.generate(labels, sampler, gen)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        row = {"dims": dims, "size": size, "steps": sampler.steps, "sampler": sampler.name, "preset": args.preset,
               "device": str(device), "threads": args.threads, "s_per_case": float(np.median(times)),
               "cases_per_s": 1.0 / float(np.median(times)),
               "load_avg_1min": os.getloadavg()[0]}  # other processes on the machine skew CPU timings
        if device.type == "cuda":
            row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        rows.append(row)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    for row in rows:
        row["peak_rss_mib"] = peak_rss
    return {"rows": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--preset", default="tiny", help="synthesizer preset or config JSON")
    p.add_argument("--sampler", default="dpmpp", choices=["dpmpp", "unipc", "ddim", "ddpm"])
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--sizes3d", type=int, nargs="*", default=[32, 64])
    p.add_argument("--sizes2d", type=int, nargs="*", default=[64, 256])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="bench_sampling.json", help="JSON file for the results")
    p.add_argument("--plot", default="bench_sampling.png", help="PNG of seconds per case against steps ('' = none)")
    p.add_argument("--_child", nargs=2, type=int, metavar=("DIMS", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child:
        args.dims, args.size = args._child
        print(json.dumps(_one(args)))
        return

    rows = []
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    for dims, sizes in ((3, args.sizes3d), (2, args.sizes2d)):
        for size in sizes:
            cmd = [sys.executable, __file__, "--_child", str(dims), str(size), "--device", args.device,
                   "--preset", args.preset, "--sampler", args.sampler, "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--steps", *map(str, args.steps)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{dims}D {size}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            for row in json.loads(proc.stdout.strip().splitlines()[-1])["rows"]:
                rows.append(row)
                mem = f"{row['peak_gpu_mib']:.0f} MiB GPU" if "peak_gpu_mib" in row else f"{row['peak_rss_mib']:.0f} MiB RSS"
                print(f"{dims}D {size:>4}^{dims}  {row['sampler']:>5} {row['steps']:>4} steps  "
                      f"{row['s_per_case']:8.3f} s/case  {row['cases_per_s']:7.2f} cases/s  peak {mem}  "
                      f"(load {row['load_avg_1min']:.1f})", flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    if args.plot and rows:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in sorted({(r["dims"], r["size"]) for r in rows}):
            rs = [r for r in rows if (r["dims"], r["size"]) == key]
            ax.plot([r["steps"] for r in rs], [r["s_per_case"] for r in rs], marker="o", label=f"{key[0]}D {key[1]}")
        ax.set_xlabel("sampler steps")
        ax.set_ylabel("seconds per case")
        ax.set_yscale("log")
        ax.set_title(f"{args.sampler}, preset {args.preset}, {args.device}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
    print(f"results: {args.out}" + (f", plot: {args.plot}" if args.plot else ""))


if __name__ == "__main__":
    main()
