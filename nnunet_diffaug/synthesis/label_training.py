"""Training the label generator of one fold: label autoencoder, then attribute-conditioned label diffusion.

Runs after the image stages of ``diffaug_train_synthesizer`` with the same machinery: resumable
safetensors checkpoints, per-step seeds (a resumed run draws the same batches; under torchrun each process
adds its rank), a loss-curve PNG and a montage per stage.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nnunet_diffaug.synthesis import checkpoint as ckpt
from nnunet_diffaug.synthesis import distributed
from nnunet_diffaug.synthesis.autoencoder import estimate_scale_factor
from nnunet_diffaug.synthesis.config import SynthesizerConfig
from nnunet_diffaug.synthesis.ema import EMA_MODULE, build_ema, update_ema
from nnunet_diffaug.synthesis.data import DataSpec, FoldData
from nnunet_diffaug.synthesis.conditioning import one_hot
from nnunet_diffaug.synthesis.image_generator import diffusion_target
from nnunet_diffaug.synthesis.label_attributes import volume_fractions
from nnunet_diffaug.synthesis.label_autoencoder import decode_to_classes, label_autoencoder_loss
from nnunet_diffaug.synthesis.checkpoint import final_file
from nnunet_diffaug.synthesis.label_generator import (LABEL_STAGES, LabelGenerator, canvas_shape, centre_pads,
                                                      condition_vector)
from nnunet_diffaug.synthesis.sampling import padded_shape
from nnunet_diffaug.synthesis.plotting import save_montage
from nnunet_diffaug.synthesis.stage_runner import INIT_STEP, learning_rate_at, run_stage

MAX_STORED_ATTRIBUTES = 4096  # training attribute vectors kept for drawing unrequested classes
SCALE_FACTOR_STREAM = 98  # the image stages draw theirs from 99


def _step_seed(seed: int, stage: str, step: int, rank: int = 0) -> int:
    """Process 0 keeps the single-process seeds; process r > 0 draws from its own stream."""
    words = [seed, 10 + LABEL_STAGES.index(stage), step] + ([rank] if rank else [])
    return int(np.random.SeedSequence(words).generate_state(1)[0])




class TrainingLabelMaps:
    """The fold's training label maps (3D volumes or 2D slices), cropped/padded to the canvas.

    Padding uses the 'outside' class: beyond a small case there is nothing, as in nnU-Net's crop.
    """

    def __init__(self, data: FoldData, spec: DataSpec, cfg: SynthesizerConfig):
        lg = cfg.label_generator
        volumes = [data.label_volume(c) for c in data.training_cases]
        self.maps = volumes if spec.spatial_dims == 3 else [v[z] for v in volumes for z in range(v.shape[0])]
        self.outside = spec.outside_class
        self.num_classes = spec.num_classes
        self.num_foreground = len(spec.label_values) - 1  # declared foreground classes: the attributes
        max_shape = lg.max_shape_3d if spec.spatial_dims == 3 else lg.max_shape_2d
        self.canvas = canvas_shape([m.shape for m in self.maps], max_shape)
        self.padded = padded_shape(self.canvas, lg.divisor())

    def _fit(self, m: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """Crop (random, or central without rng) to at most the canvas, then pad to the canvas."""
        sl = []
        for s, c in zip(m.shape, self.canvas):
            start = 0 if s <= c else (int(rng.integers(s - c + 1)) if rng is not None else (s - c) // 2)
            sl.append(slice(start, start + min(s, c)))
        m = m[tuple(sl)]
        return np.pad(m, centre_pads(list(m.shape), self.canvas), constant_values=self.outside)

    def attributes(self, m: np.ndarray) -> np.ndarray:
        return volume_fractions(m, self.num_foreground)

    def all_attributes(self) -> np.ndarray:
        return np.stack([self.attributes(self._fit(m, None)) for m in self.maps])

    def batch(self, rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, np.ndarray, list[np.ndarray]]:
        """(one-hot (B, C, *padded), attributes (B, A), canvas maps)."""
        maps = [self._fit(self.maps[int(rng.integers(len(self.maps)))], rng) for _ in range(batch_size)]
        attrs = np.stack([self.attributes(m) for m in maps])
        padded = [np.pad(m, centre_pads(self.canvas, self.padded), constant_values=self.outside) for m in maps]
        idx = torch.from_numpy(np.stack(padded)[:, None].astype(np.int64))
        return one_hot(idx, self.num_classes), attrs, maps


def _montage(path: Path, title: str, rows: list[tuple[str, list[np.ndarray]]], num_classes: int) -> None:
    rows = [(name, [m.astype(np.float32) for m in maps]) for name, maps in rows]
    save_montage(path, rows, [m.astype(np.int64) for m in rows[-1][1]], num_classes, title, 0, num_classes - 1)


def train_label_generator(cfg: SynthesizerConfig, spec: DataSpec, data: FoldData, folder: Path,
                          device: torch.device, seed: int, log, progress: bool,
                          stop_after: int | None = None, init=None) -> bool:
    """Trains (or resumes, or skips) both label stages. Returns True when both have finished. ``init``: an
    ``outside_data.InitSource`` whose label generator each stage starts from (when the label sets agree)."""
    lg = cfg.label_generator
    maps = TrainingLabelMaps(data, spec, cfg)
    # initial weights must not depend on what ran before in this process (a resumed run skips finished stages)
    torch.manual_seed(_step_seed(seed, "label_autoencoder", INIT_STEP))
    gen = LabelGenerator(lg, spec.spatial_dims, spec.num_classes, len(spec.label_values) - 1, device)
    n_mont = min(cfg.montage_cases, 8)
    title = f"{spec.dataset_name} {spec.configuration} fold {spec.fold}"

    # ---- stage 1: label autoencoder
    ae = gen.autoencoder
    if final_file(folder, "label_autoencoder").is_file():
        log("label_autoencoder: finished earlier, skipped")
        tensors, _ = ckpt.load_checkpoint(final_file(folder, "label_autoencoder"), device)
        ae.load_state_dict(ckpt.unprefixed("label_autoencoder", tensors))
    else:
        log(f"label generator: {len(maps.maps)} training map(s), canvas {maps.canvas} (padded {maps.padded})")
        if init is not None and not (folder / "label_autoencoder_checkpoint.safetensors").is_file():
            init.load_stage("label_autoencoder", ae, folder, log)
        opt = torch.optim.Adam(ae.parameters(), lr=lg.autoencoder_learning_rate)
        train_ae = distributed.for_training(ae)

        def ae_step(step: int) -> dict[str, float]:
            s = _step_seed(seed, "label_autoencoder", step, distributed.rank())
            torch.manual_seed(s)  # AutoencoderKL's posterior sample uses the global generator
            onehot, _, _ = maps.batch(np.random.default_rng(s), lg.autoencoder_batch_size)
            onehot = onehot.to(device)
            ae.train()
            logits, z_mu, z_sigma = train_ae(onehot)
            loss, parts = label_autoencoder_loss(lg, logits.float(), onehot, z_mu.float(), z_sigma.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return parts

        run_stage("label_autoencoder", folder, lg.autoencoder_steps, cfg.checkpoint_every,
                   {"label_autoencoder": ae}, {"label_autoencoder": opt}, ae_step, {}, ["label_autoencoder"],
                   log, progress, stop_after)
        if not final_file(folder, "label_autoencoder").is_file():
            return False
        if distributed.is_main_process():
            _autoencoder_montage(ae, maps, folder, title, spec.num_classes, n_mont, device, seed)
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)

    # ---- stage 2: attribute-conditioned latent diffusion
    if final_file(folder, "label_diffusion").is_file():
        log("label_diffusion: finished earlier, skipped")
        return True
    model, scheduler = gen.model, gen.train_scheduler
    if init is not None and not (folder / "label_diffusion_checkpoint.safetensors").is_file():
        init.load_stage("label_diffusion", model, folder, log)
    opt = torch.optim.Adam(model.parameters(), lr=lg.learning_rate)
    ema = build_ema(model, lg.ema_decay)  # before the DDP wrapper: it averages the plain module's weights
    modules = {"label_model": model} if ema is None else {"label_model": model, EMA_MODULE: ema}
    train_model = distributed.for_training(model)
    extra: dict = {}
    cpath = folder / "label_diffusion_checkpoint.safetensors"
    if cpath.is_file():
        extra.update(ckpt.read_state(cpath)["extra"])
    else:
        attrs = maps.all_attributes()
        keep = np.random.default_rng([seed, 79]).permutation(len(attrs))[:MAX_STORED_ATTRIBUTES]
        extra.update(canvas=maps.canvas, attribute_mean=attrs.mean(0).tolist(),
                     attribute_std=np.maximum(attrs.std(0), 1e-3).tolist(),  # a constant class must not divide by 0
                     training_attributes=attrs[np.sort(keep)].tolist(),
                     scale_factor=distributed.value_of_main_process(
                         estimate_scale_factor(ae, maps, lg.scale_factor_batches, lg.batch_size, device, seed,
                                               SCALE_FACTOR_STREAM)))
        log(f"label_diffusion: latent scale factor {extra['scale_factor']:.4g}")
    gen.state.update(extra)

    def dm_step(step: int) -> dict[str, float]:
        s = _step_seed(seed, "label_diffusion", step, distributed.rank())
        rng, g = np.random.default_rng(s), torch.Generator().manual_seed(s)
        onehot, attrs, _ = maps.batch(rng, lg.batch_size)
        with torch.no_grad():
            z = ae.encode(onehot.to(device))[0].float() * extra["scale_factor"]
        noise = torch.randn(z.shape, generator=g).to(device)
        t = torch.randint(0, scheduler.num_train_timesteps, (z.shape[0],), generator=g).to(device)
        keep = torch.from_numpy((rng.random(len(attrs)) >= lg.condition_dropout).astype(np.float32))
        cond = condition_vector(gen.standardise(attrs), keep).to(device)
        for group in opt.param_groups:
            group["lr"] = learning_rate_at(step, lg.learning_rate, lg.steps, "cosine", lg.warmup_steps)
        model.train()
        pred = train_model(scheduler.add_noise(original_samples=z, noise=noise, timesteps=t), t, cond)
        loss = torch.nn.functional.mse_loss(pred.float(), diffusion_target(scheduler, z, noise, t).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        update_ema(ema, model)
        return {"mse": float(loss.detach())}

    run_stage("label_diffusion", folder, lg.steps, cfg.checkpoint_every, modules,
               {"label_model": opt}, dm_step, extra, list(modules), log, progress, stop_after)
    if not final_file(folder, "label_diffusion").is_file():
        return False
    model.eval()
    if ema is not None:  # the montage samples from the EMA, as loading does
        gen.model = ema.module.eval()
    if distributed.is_main_process():
        _diffusion_montage(gen, maps, folder, title, spec.num_classes, n_mont, seed)
    return True


@torch.no_grad()
def _autoencoder_montage(ae, maps: TrainingLabelMaps, folder: Path, title: str, num_classes: int, n: int, device,
                         seed: int) -> None:
    from nnunet_diffaug.synthesis.label_generator import crop_centre
    ae.eval()
    onehot, _, real = maps.batch(np.random.default_rng([seed, 78]), n)
    recon = decode_to_classes(ae, ae.encode(onehot.to(device))[0]).cpu().numpy()
    _montage(folder / "label_autoencoder_montage.png", f"label_autoencoder: {title}",
             [("real", real), ("reconstruction", list(crop_centre(recon, maps.canvas)))], num_classes)


def _diffusion_montage(gen: LabelGenerator, maps: TrainingLabelMaps, folder: Path, title: str, num_classes: int,
                       n: int, seed: int) -> None:
    real = [maps._fit(maps.maps[i], None) for i in np.random.default_rng([seed, 80]).integers(len(maps.maps),
                                                                                             size=n)]
    fake = gen.sample(None, n, 1.0, gen.sampler(), torch.Generator().manual_seed(seed))
    _montage(folder / "label_diffusion_montage.png", f"label_diffusion (unconditional samples): {title}",
             [("training maps", real), ("generated", list(fake))], num_classes)
