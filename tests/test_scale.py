"""Synthesizer at scale: EMA weights, rectified flow, windowed latent denoising, gradient checkpointing.

All CPU-sized: tiny UNets on tiny tensors made here (no nnU-Net dataset), a few seconds each.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.synthesis import checkpoint as ckpt
from nnunet_diffaug.synthesis.conditioning import Condition, one_hot
from nnunet_diffaug.synthesis.config import SynthesizerConfig, load_config
from nnunet_diffaug.synthesis.data import DataSpec
from nnunet_diffaug.synthesis.ema import EMA_MODULE, build_ema, update_ema
from nnunet_diffaug.synthesis.grad_checkpoint import enable_gradient_checkpointing
from nnunet_diffaug.synthesis.image_generator import (build_image_generator, build_train_scheduler, diffusion_target,
                                                      training_timesteps)
from nnunet_diffaug.synthesis.sampling import Sampler, model_output, sample_latents, sample_latents_inpaint
from nnunet_diffaug.synthesis.synthesizer import Synthesizer, final_file


def _diffusion_cfg(**changes):
    cfg = load_config("tiny").diffusion
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def _bars(n: int, size: int, dims: int, rng: np.random.Generator) -> torch.Tensor:
    """Class maps (n, 1, *spatial): one random box of class 1 (+ a thinner one of class 2) per map."""
    labels = np.zeros((n, 1) + (size,) * dims, dtype=np.int64)
    for i in range(n):
        lo = rng.integers(0, size // 2, dims)
        hi = lo + rng.integers(size // 4, size // 2, dims)
        labels[(i, 0, *[slice(a, b) for a, b in zip(lo, hi)])] = 1
        c = rng.integers(0, size - 2)
        labels[(i, 0, slice(c, c + 2))] = 2
    return torch.from_numpy(labels)


def _intensity(labels: torch.Tensor) -> torch.Tensor:
    """The "latent" these tests learn: a fixed value per class (the model must read the labels)."""
    return torch.tensor([0.0, -1.5, 1.5, 0.0])[labels].float()


def _train(model, scheduler, dims: int, steps: int, seed: int = 0, size: int = 16, lr: float = 3e-3):
    """A few optimizer steps of the synthesizer's diffusion objective on `_bars` data; returns the losses."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng, gen, losses = np.random.default_rng(seed), torch.Generator().manual_seed(seed), []
    model.train()
    for _ in range(steps):
        labels = _bars(8, size, dims, rng)
        z = _intensity(labels)
        noise = torch.randn(z.shape, generator=gen)
        t = training_timesteps(scheduler, z, gen)
        pred = model(scheduler.add_noise(z, noise, t), t, Condition(one_hot(labels, 4)))
        loss = torch.nn.functional.mse_loss(pred, diffusion_target(scheduler, z, noise, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return model.eval(), losses


def _fidelity(model, scheduler, sampler_name: str, steps: int, dims: int, size: int = 16) -> float:
    """Mean absolute error between samples and each class's intensity over held-out label maps."""
    labels = _bars(4, size, dims, np.random.default_rng(123))
    z = sample_latents(model, Condition(one_hot(labels, 4)), tuple(labels.shape), Sampler(sampler_name, scheduler, steps),
                       torch.Generator().manual_seed(5))
    return float((z - _intensity(labels)).abs().mean())


# ---------------------------------------------------------------------------------------------- EMA

def test_ema_is_the_exponential_average_of_the_weights():
    model = torch.nn.Linear(3, 2)
    ema = build_ema(model, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = None
    for _step in range(5):
        loss = model(torch.randn(4, 3)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema(ema, model)
        w = model.weight.detach().clone()
        expected = w if expected is None else 0.9 * expected + 0.1 * w  # the first update copies the weights
    torch.testing.assert_close(ema.module.weight, expected)
    assert not torch.allclose(ema.module.weight, model.weight)
    assert build_ema(model, 0.0) is None


def test_ema_decay_is_checked_and_on_in_the_default_preset():
    assert load_config("default").diffusion.ema_decay == load_config("default").label_generator.ema_decay == 0.999
    with pytest.raises(DiffAugError, match="ema_decay"):
        SynthesizerConfig.from_json({"diffusion": {"ema_decay": 1.0}}, "my.json")
    with pytest.raises(DiffAugError, match="label_generator.ema_decay"):
        SynthesizerConfig.from_json({"label_generator": {"ema_decay": -0.1}}, "my.json")


def test_resume_restores_the_ema(tmp_path):
    from nnunet_diffaug.synthesis.stage_runner import run_stage as _run_stage

    def run(folder: Path, stop_after):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        ema = build_ema(model, 0.8)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)

        def step_fn(step: int):
            x = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            update_ema(ema, model)
            return {"loss": float(loss)}
        folder.mkdir(exist_ok=True)
        _run_stage("diffusion", folder, 8, 100, {"model": model, EMA_MODULE: ema}, {"model": opt}, step_fn, {},
                   ["model", EMA_MODULE], lambda msg: None, False, stop_after)
        return ema

    straight = run(tmp_path / "a", None)
    run(tmp_path / "b", 3)  # killed after 3 steps ...
    resumed = run(tmp_path / "b", None)  # ... and rerun
    assert torch.equal(resumed.module.weight, straight.module.weight)
    assert int(resumed.n_averaged) == 8
    tensors, _ = ckpt.load_checkpoint(final_file(tmp_path / "b", "diffusion"))
    assert "model.weight" in tensors and f"{EMA_MODULE}.module.weight" in tensors


def _write_synthesizer(folder: Path, with_ema: bool) -> tuple[dict, dict]:
    cfg = load_config("tiny")
    spec = DataSpec("Dataset999_X", "2d", "nnUNetPlans", 0, ["a"], 2, 1, [0, 1], ["ZScoreNormalization"], [-2.0],
                    [2.0], [32, 32])
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_json()))
    (folder / "synthesizer.json").write_text(json.dumps({"spec": spec.to_json(), "seed": 0}))
    syn = Synthesizer(cfg, spec, torch.device("cpu"))
    ckpt.save_checkpoint(final_file(folder, "autoencoder"), ckpt.prefixed("autoencoder", syn.autoencoder.state_dict()),
                         {})
    raw = {k: v.clone() for k, v in syn.model.state_dict().items()}
    ema = {k: v + 0.01 for k, v in raw.items()}
    tensors = ckpt.prefixed("model", raw)
    if with_ema:
        tensors.update(ckpt.prefixed(f"{EMA_MODULE}.module", ema))
    ckpt.save_checkpoint(final_file(folder, "diffusion"), tensors, {"scale_factor": 1.0})
    return raw, ema


def test_sampling_uses_the_ema_and_old_files_load_as_before(tmp_path):
    raw, ema = _write_synthesizer(tmp_path / "new", with_ema=True)
    name = next(iter(raw))
    syn = Synthesizer.load(tmp_path / "new", torch.device("cpu"))
    assert syn.weights == "ema" and torch.equal(syn.model.state_dict()[name], ema[name])
    syn_raw = Synthesizer.load(tmp_path / "new", torch.device("cpu"), weights="raw")
    assert syn_raw.weights == "raw" and torch.equal(syn_raw.model.state_dict()[name], raw[name])
    raw_old, _ = _write_synthesizer(tmp_path / "old", with_ema=False)
    old = Synthesizer.load(tmp_path / "old", torch.device("cpu"))
    assert old.weights == "raw" and torch.equal(old.model.state_dict()[name], raw_old[name])
    labels = np.zeros((1, 32, 32), np.int64)
    labels[:, 8:20, 4:28] = 1
    a = syn.generate(labels, syn.sampler(steps=2), torch.Generator().manual_seed(0))
    b = syn_raw.generate(labels, syn_raw.sampler(steps=2), torch.Generator().manual_seed(0))
    assert not np.allclose(a, b)  # the EMA weights, not the raw ones, painted the image


# ---------------------------------------------------------------------------------------------- rectified flow

def test_rflow_config_refuses_ddpm_samplers_and_vice_versa():
    with pytest.raises(DiffAugError, match="my.json.*sampling.sampler 'dpmpp' does not fit diffusion.objective"):
        SynthesizerConfig.from_json({"diffusion": {"objective": "rflow"}}, "my.json")
    cfg = SynthesizerConfig.from_json({"diffusion": {"objective": "rflow"}, "sampling": {"sampler": "rflow"}})
    rflow = build_train_scheduler(cfg.diffusion)
    with pytest.raises(DiffAugError, match="--sampler rflow"):
        Sampler("ddim", rflow, 10)
    with pytest.raises(DiffAugError, match="needs a model trained with diffusion.objective 'rflow'"):
        Sampler("rflow", build_train_scheduler(_diffusion_cfg()), 10)
    with pytest.raises(DiffAugError, match="diffusion.objective"):
        SynthesizerConfig.from_json({"diffusion": {"objective": "flow"}})


def test_rflow_euler_steps_integrate_the_straight_path_exactly():
    # the exact velocity of a straight path from noise to x0 = 2 reaches x0 whatever the number of steps
    scheduler = build_train_scheduler(_diffusion_cfg(objective="rflow"))
    for steps in (1, 7, 30):
        sampler = Sampler("rflow", scheduler, steps)
        noise = torch.randn(1, 1, 4, 4)
        z = noise.clone()
        for t in sampler.timesteps:
            z = sampler.step(2.0 - noise, t, z, None)
        torch.testing.assert_close(z, torch.full_like(z, 2.0))
        assert sampler.timesteps[0] == 1000 and len(sampler.timesteps) == steps


@pytest.mark.parametrize("dims", [2, 3])
def test_rflow_training_learns_and_10_steps_follow_the_labels(dims):
    cfg = _diffusion_cfg(objective="rflow")
    torch.manual_seed(0)
    untrained = build_image_generator(cfg, dims, 1, 4).eval()
    scheduler = build_train_scheduler(cfg)
    before = _fidelity(untrained, scheduler, "rflow", 10, dims, size=8 if dims == 3 else 16)
    model, losses = _train(build_image_generator(cfg, dims, 1, 4), scheduler, dims, 60 if dims == 3 else 120,
                           size=8 if dims == 3 else 16)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    after = _fidelity(model, scheduler, "rflow", 10, dims, size=8 if dims == 3 else 16)
    assert after < 0.6 * before, (before, after)


# ---------------------------------------------------------------------------------------------- windows

class _Pointwise(torch.nn.Module):
    """Each latent voxel's output depends on that voxel and its own block of the condition only."""

    def forward(self, z, t, condition):
        f = condition.spatial.shape[2] // z.shape[2]
        pooled = torch.nn.functional.avg_pool2d(condition.spatial, f) if z.ndim == 4 else \
            torch.nn.functional.avg_pool3d(condition.spatial, f)
        return 0.5 * z + pooled[:, 1:2] - pooled[:, 2:3] + t.float().view(-1, *[1] * (z.ndim - 1)) / 1000


def test_windowed_denoising_blends_back_to_the_whole_latent_result():
    labels = _bars(2, 64, 2, np.random.default_rng(0))
    cond = Condition(one_hot(labels, 4))
    z = torch.randn(2, 1, 16, 16)
    whole = model_output(_Pointwise(), z, 300, cond, torch.long)
    windowed = model_output(_Pointwise(), z, 300, cond, torch.long, window=[4, 8], overlap=0.5)
    torch.testing.assert_close(windowed, whole)  # right condition region for every window and batch element


def test_windowed_sampling_with_a_real_unet():
    cfg = _diffusion_cfg()
    scheduler = build_train_scheduler(cfg)
    torch.manual_seed(0)  # a few steps: an untrained MONAI UNet's zeroed output layer predicts 0 everywhere
    model, _ = _train(build_image_generator(cfg, 2, 1, 4), scheduler, 2, 3)
    labels = _bars(1, 32, 2, np.random.default_rng(1))
    cond = Condition(one_hot(labels, 4))

    def sample(window):
        return sample_latents(model, cond, (1, 1, 16, 16), Sampler("ddim", scheduler, 3),
                              torch.Generator().manual_seed(0), window=window)
    torch.testing.assert_close(sample([16, 16]), sample(None))  # the window covers the latent: unchanged
    seen = []  # bounded memory by construction: the UNet never runs on more than one window
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[2:])))
    big = sample([8, 8])  # latent 4x the window
    hook.remove()
    assert seen and set(seen) == {(8, 8)}
    assert torch.isfinite(big).all() and not torch.allclose(big, sample(None))


def test_windowed_repaint_keeps_the_known_latents_and_matches_whole_latent_sampling_when_the_window_covers_it():
    cfg = _diffusion_cfg()
    scheduler = build_train_scheduler(cfg)
    torch.manual_seed(0)
    model, _ = _train(build_image_generator(cfg, 2, 1, 4), scheduler, 2, 3)
    cond = Condition(one_hot(_bars(1, 32, 2, np.random.default_rng(1)), 4))
    known = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    region = torch.zeros(1, 1, 16, 16)
    region[..., 4:12, 6:14] = 1

    def repaint(window):
        return sample_latents_inpaint(model, cond, known, region, Sampler("ddim", scheduler, 3),
                                      torch.Generator().manual_seed(0), resample_jumps=1, window=window)
    whole = repaint(None)
    torch.testing.assert_close(repaint([16, 16]), whole)
    windowed = repaint([8, 8])  # the region spans four windows
    kept = region == 0
    assert torch.equal(windowed[kept], known[kept]) and torch.isfinite(windowed).all()
    assert not torch.allclose(windowed[~kept], known[~kept])  # the region was sampled, not copied


# ---------------------------------------------------------------------------------------------- checkpointing

@pytest.mark.parametrize("conditioning", ["spade", "controlnet"])
def test_gradient_checkpointing_gives_the_same_training(conditioning):
    cfg = _diffusion_cfg(conditioning=conditioning, controlnet_embedding_channels=(16,))
    scheduler = build_train_scheduler(cfg)
    runs = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_image_generator(cfg, 2, 1, 4)
        if checkpointed:
            assert enable_gradient_checkpointing(model) >= 7
        _, losses = _train(model, scheduler, 2, 3)
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rflow_10_steps_match_50_step_ddim_of_a_v_prediction_model():
    errors = {}
    for objective, sampler, steps in (("rflow", "rflow", 10), ("ddpm", "ddim", 50)):
        cfg = _diffusion_cfg(objective=objective)  # ddpm: the tiny preset's v-prediction
        scheduler = build_train_scheduler(cfg)
        torch.manual_seed(0)
        model, _ = _train(build_image_generator(cfg, 2, 1, 4), scheduler, 2, 120)
        errors[objective] = _fidelity(model, scheduler, sampler, steps, 2)
    assert errors["rflow"] <= 1.1 * errors["ddpm"], errors  # measured: 0.070 vs 0.094


def _benchmark_module(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_runs_tiny_on_the_cpu(tmp_path):
    bench = _benchmark_module("bench_gpu")
    bench.run(tmp_path, ["tiny"], True, torch.device("cpu"), 1, ["rflow:1"], ["2d"])
    rows = json.loads((tmp_path / "bench_gpu.json").read_text())["rows"]
    assert [r["what"] for r in rows[:3]] == ["train", "train (grad. checkpointing)", "sample rflow 1 steps"]
    assert all(r.get("s_per_step", r.get("s_per_case", 0)) > 0 and r["peak_mib"] > 0 for r in rows)
    assert "| tiny | 64x64 | sample rflow 1 steps |" in (tmp_path / "bench_gpu.md").read_text()


def test_a_volume_4x_the_training_patch_samples_within_one_windows_memory():
    """Peak RSS of one generate call, each case in a fresh process (tiny preset, 3D, patch 32^3)."""
    bench = _benchmark_module("bench_window_memory")
    rows = bench.measure("tiny", 3, "cpu", steps=1, threads=1)
    one, windowed, whole = (rows[case] for case in ("one window", "4x volume, windowed", "4x volume, whole latent"))
    assert windowed["shape"] == "64x64x32" and one["shape"] == one["training_patch"] == "32x32x32"
    assert windowed["peak_mib"] <= 1.5 * one["peak_mib"], rows
    # what sampling itself holds: the windows keep it near one window's (measured 1.35x: the 4x volume's own
    # label map, condition and output buffers), where the whole latent needs more (measured 1.86x)
    assert windowed["peak_growth_mib"] <= 1.5 * one["peak_growth_mib"], rows
    assert whole["peak_growth_mib"] >= 1.25 * windowed["peak_growth_mib"], rows
