"""Synthesizer cost per preset and shape: diffusion training s/step, sampling s/case, peak memory.

Random weights and random label maps (cost does not depend on training). For each preset and shape:

- training: one diffusion step (encode with the autoencoder, UNet forward + backward, Adam step) on a
  patch of that shape at the preset's batch size, with and without gradient checkpointing;
- sampling: ``Synthesizer.generate`` of one case of that shape per sampler and step count (latents larger
  than the training patch's latent are denoised in windows, decoding is windowed);
- peak memory: ``torch.cuda.max_memory_allocated`` per measurement on CUDA; on the CPU the process's peak
  RSS so far (it only grows, so it bounds each measurement from above).

    python benchmarks/bench_gpu.py -o /tmp/bench_gpu                 # GPU: default preset, real shapes
    python benchmarks/bench_gpu.py -o /tmp/bench_gpu --tiny -device cpu   # seconds: tiny preset, tiny shapes

Writes ``bench_gpu.json`` and ``bench_gpu.md`` into the output folder and prints the table.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nnunet_diffaug.synthesis.autoencoder import encode_mean
from nnunet_diffaug.synthesis.config import load_config
from nnunet_diffaug.synthesis.data import DataSpec
from nnunet_diffaug.synthesis.grad_checkpoint import enable_gradient_checkpointing
from nnunet_diffaug.synthesis.image_generator import diffusion_target, training_timesteps
from nnunet_diffaug.synthesis.sampling import autocast
from nnunet_diffaug.synthesis.synthesizer import Synthesizer, resolve_device

SHAPES = {"3d": [(64, 64, 64), (128, 128, 128), (256, 256, 256)], "2d": [(256, 256), (512, 512)]}
TINY_SHAPES = {"3d": [(16, 16, 16), (32, 32, 32)], "2d": [(32, 32), (64, 64)]}
SAMPLERS = ["dpmpp:20", "ddim:50", "rflow:10", "rflow:30"]
TINY_SAMPLERS = ["dpmpp:2", "rflow:2"]


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def _synthesizer(preset: str, shape: tuple[int, ...], objective: str, device: torch.device) -> Synthesizer:
    cfg = load_config(preset)
    if objective == "rflow":
        cfg.diffusion.objective, cfg.sampling.sampler = "rflow", "rflow"
    dims = len(shape)
    patch = cfg.data.patch_size_3d if dims == 3 else cfg.data.patch_size_2d
    spec = DataSpec("Dataset000_Bench", f"{dims}d", "nnUNetPlans", 0, ["a"], dims, 1, [0, 1, 2],
                    ["ZScoreNormalization"], [-3.0], [3.0], [min(p, s) for p, s in zip(patch, shape)])
    return Synthesizer(cfg, spec, device)


def _labels(n: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Blobby 3-class maps (smoothed noise thresholded), so the conditioning is not constant."""
    import scipy.ndimage as ndi
    noise = ndi.gaussian_filter(rng.standard_normal((n, *shape)), [0] + [max(1, s // 16) for s in shape])
    return np.digitize(noise, np.quantile(noise, [0.6, 0.85])).astype(np.int64)


def _time_training(syn: Synthesizer, shape, device, checkpointing: bool, repeats: int) -> dict:
    cfg = syn.config
    if checkpointing:
        enable_gradient_checkpointing(syn.model)
    model, scheduler = syn.model.train(), syn.train_scheduler
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    bs = cfg.diffusion.batch_size
    times = []
    _reset_peak(device)
    for k in range(repeats + 1):  # the first step warms up (cudnn autotuning, allocations)
        labels = torch.from_numpy(_labels(bs, shape, rng))[:, None].to(device)
        images = torch.randn(bs, 1, *shape, generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(device, cfg.mixed_precision):
            z = encode_mean(syn.autoencoder, images).float()
        noise = torch.randn(z.shape, generator=gen).to(device)
        t = training_timesteps(scheduler, z, gen)
        noisy = scheduler.add_noise(original_samples=z, noise=noise, timesteps=t)
        with autocast(device, cfg.mixed_precision):
            pred = model(noisy, t, syn.condition(labels))
        loss = torch.nn.functional.mse_loss(pred.float(), diffusion_target(scheduler, z, noise, t).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if k:
            times.append(time.perf_counter() - t0)
    peak, kind = _peak_mib(device)
    return {"s_per_step": float(np.median(times)), "batch_size": bs, "peak_mib": peak, "memory": kind}


def _time_sampling(syn: Synthesizer, shape, device, sampler: str, steps: int) -> dict:
    syn.model.eval()
    labels = _labels(1, shape, np.random.default_rng(1))
    _reset_peak(device)
    syn.generate(labels[(slice(None), *[slice(0, min(s, 16)) for s in shape])], syn.sampler(sampler, 1),
                 torch.Generator().manual_seed(0))  # warm-up
    t0 = time.perf_counter()
    syn.generate(labels, syn.sampler(sampler, steps), torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - t0
    peak, kind = _peak_mib(device)
    return {"s_per_case": seconds, "peak_mib": peak, "memory": kind}


def _guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError as e:  # a result too: this shape does not fit
        torch.cuda.empty_cache()
        return {"error": f"out of memory ({str(e).splitlines()[0][:80]})"}


def run(out: Path, presets: list[str], tiny: bool, device: torch.device, repeats: int,
        samplers: list[str] | None = None, dims: list[str] | None = None) -> list[dict]:
    shapes = TINY_SHAPES if tiny else SHAPES
    samplers = samplers or (TINY_SAMPLERS if tiny else SAMPLERS)
    rows = []
    for preset in presets:
        for d in dims or ["3d", "2d"]:
            for shape in shapes[d]:
                base = {"preset": preset, "shape": "x".join(map(str, shape)), "device": str(device)}
                for ckpt_on in (False, True):
                    syn = _synthesizer(preset, shape, "ddpm", device)
                    rows.append({**base, "what": "train" + (" (grad. checkpointing)" if ckpt_on else ""),
                                 **_guarded(_time_training, syn, shape, device, ckpt_on, repeats)})
                    del syn
                for spec in samplers:
                    name, steps = spec.split(":")
                    syn = _synthesizer(preset, shape, "rflow" if name == "rflow" else "ddpm", device)
                    rows.append({**base, "what": f"sample {name} {steps} steps",
                                 **_guarded(_time_sampling, syn, shape, device, name, int(steps))})
                    del syn
                print(json.dumps(rows[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "device_name": torch.cuda.get_device_name() if device.type == "cuda"
            else "cpu", "tiny": tiny}
    (out / "bench_gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "bench_gpu.md").write_text(markdown(rows, meta))
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Device: {meta['device_name']}, torch {meta['torch']}", "",
             "| preset | shape | what | seconds | peak MiB | memory |", "|---|---|---|---|---|---|"]
    for r in rows:
        sec = r.get("s_per_step", r.get("s_per_case"))
        cell = r["error"] if "error" in r else f"{sec:.3f}" + (" /step" if "s_per_step" in r else " /case")
        peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
        lines.append(f"| {r['preset']} | {r['shape']} | {r['what']} | {cell} | {peak} | {r.get('memory', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--presets", nargs="+", default=None, help="default: 'default' (tiny with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny preset and shapes: checks the script on a CPU")
    p.add_argument("--dims", nargs="+", choices=["2d", "3d"], default=None)
    p.add_argument("--samplers", nargs="+", default=None, help="name:steps, e.g. dpmpp:20 rflow:30")
    p.add_argument("--repeats", type=int, default=3, help="timed training steps (after one warm-up)")
    p.add_argument("-device", default="auto")
    a = p.parse_args(argv)
    rows = run(a.out, a.presets or (["tiny"] if a.tiny else ["default"]), a.tiny, resolve_device(a.device),
               a.repeats, a.samplers, a.dims)
    print((a.out / "bench_gpu.md").read_text())
    sys.exit(0 if rows else 1)


if __name__ == "__main__":
    main()
