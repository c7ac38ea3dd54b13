"""Bounded memory at sampling: peak memory of one synthetic case as the volume grows past the training patch.

Each measurement runs ``Synthesizer.generate`` (random weights: memory does not depend on training) in a fresh
process and reports the process's peak RSS (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA), and how much it
grew during that one call (the peak includes the interpreter, torch and the weights; the growth is what
sampling itself holds, the stricter figure). Cases, for a preset and its training patch P:

- ``one window``: a volume of exactly P (one window: what training itself holds);
- ``4x volume, windowed``: twice P along the first two axes (4x the voxels), latents denoised and decoded in
  overlapping windows of P (the default);
- ``4x volume, whole latent``: the same volume with ``"sampling": {"diffusion_windows": false}``: the UNet runs on
  the whole latent (decoding stays windowed), the control that shows what the windows save.

    python benchmarks/bench_window_memory.py --preset tiny -device cpu --dims 3 -o /tmp/window_memory.json

Prints a Markdown table with the ratios to one window (the goal: the windowed 4x volume within 1.5x).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASES = {"one window": (1, True), "4x volume, windowed": (2, True), "4x volume, whole latent": (2, False)}


def measure_one(preset: str, dims: int, grow: int, windows: bool, device_name: str, steps: int,
                threads: int | None = None) -> dict:
    """In this process: the peak-memory growth of generating one case of (grow x P) along the first two axes.
    ``threads``: CPU threads (per-thread scratch buffers make small measurements vary with the thread count)."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    from bench_gpu import _peak_mib, _reset_peak, _synthesizer  # this folder: the child runs as a script here

    from nnunet_diffaug.synthesis.config import load_config
    from nnunet_diffaug.synthesis.synthesizer import resolve_device

    torch.manual_seed(0)
    device = resolve_device(device_name)
    cfg = load_config(preset)
    patch = list(cfg.data.patch_size_3d if dims == 3 else cfg.data.patch_size_2d)
    syn = _synthesizer(preset, tuple(patch), "ddpm", device)
    syn.config.sampling.diffusion_windows = windows
    syn.model.eval()
    shape = [p * grow if axis < 2 else p for axis, p in enumerate(patch)]
    labels = np.random.default_rng(0).integers(0, 3, size=(1, *shape))
    # a first call on a small map loads what any call loads once (kernels, thread pools, lazy imports)
    syn.generate(labels[(slice(None), *[slice(0, max(16, p // 2)) for p in patch])], syn.sampler("ddim", 1),
                 torch.Generator().manual_seed(0))
    _reset_peak(device)
    before, _ = _peak_mib(device)
    syn.generate(labels, syn.sampler("ddim", steps), torch.Generator().manual_seed(0))
    peak, kind = _peak_mib(device)
    return {"shape": "x".join(map(str, shape)), "training_patch": "x".join(map(str, patch)),
            "diffusion_windows": windows, "peak_mib": peak, "peak_growth_mib": peak - before, "memory": kind}


def measure(preset: str, dims: int, device: str, steps: int = 2, threads: int | None = None) -> dict[str, dict]:
    """Every case, each in a fresh process (peak RSS only grows, so one process per measurement)."""
    out = {}
    for name, (grow, windows) in CASES.items():
        cmd = [sys.executable, __file__, "--child", json.dumps([preset, dims, grow, windows, device, steps, threads])]
        # large blocks straight from mmap and back on free: the peak RSS then follows live memory, not how
        # glibc's adaptive threshold happened to keep freed blocks in the heap
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def markdown(rows: dict[str, dict], preset: str) -> str:
    one = rows["one window"]["peak_growth_mib"]
    lines = [f"Preset {preset}, training patch {rows['one window']['training_patch']} "
             f"({rows['one window']['memory']})", "",
             "| case | volume | peak MiB | x one window | growth during the call, MiB | x one window |",
             "|---|---|---|---|---|---|"]
    peak = rows["one window"]["peak_mib"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['shape']} | {r['peak_mib']:.0f} | {r['peak_mib'] / peak:.2f} | "
                     f"{r['peak_growth_mib']:.0f} | {r['peak_growth_mib'] / one:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dims", type=int, choices=[2, 3], default=3)
    p.add_argument("--steps", type=int, default=2, help="sampler steps (memory does not grow with them)")
    p.add_argument("-device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("-o", "--out", type=Path, default=None, help="JSON file for the measurements")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(measure_one(*json.loads(a.child))))
        return
    rows = measure(a.preset, a.dims, a.device, a.steps, a.threads)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))
    print(markdown(rows, a.preset))


if __name__ == "__main__":
    main()
