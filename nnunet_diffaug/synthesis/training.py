"""Training the synthesizer on one fold: autoencoder, then label-conditioned latent diffusion.

Each stage checkpoints every ``checkpoint_every`` steps (one safetensors file holding weights,
optimizer moments and a JSON state), so a killed run continues where it stopped when the same
command is run again; finished stages are skipped. Every step seeds its own random generators
from (seed, stage, step), so a resumed run draws the same batches and noise as an uninterrupted one.
Several processes (torchrun) train together when asked: each adds its rank to those seeds, so each draws
its own batches (see :mod:`distributed`).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_diffaug import paths
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import atomic_write_json, folder_lock
from nnunet_diffaug.synthesis import checkpoint as ckpt
from nnunet_diffaug.synthesis import distributed
from nnunet_diffaug.synthesis.autoencoder import (AutoencoderLoss, build_autoencoder, build_discriminator,
                                                  encode_mean, estimate_scale_factor)
from nnunet_diffaug.synthesis.config import SynthesizerConfig
from nnunet_diffaug.synthesis.consistency import RUN_KEY as CONSISTENCY_KEY
from nnunet_diffaug.synthesis.consistency import ConsistencyLoss, check_same_judge, open_judge, weak_judge_note
from nnunet_diffaug.synthesis.context import fit_context
from nnunet_diffaug.synthesis.data import DataSpec, FoldData, PatchSampler, fit_patch_size
from nnunet_diffaug.synthesis.ema import EMA_MODULE, build_ema, update_ema
from nnunet_diffaug.synthesis.conditioning import Condition
from nnunet_diffaug.synthesis.grad_checkpoint import enable_gradient_checkpointing
from nnunet_diffaug.synthesis.image_generator import diffusion_target, training_timesteps
from nnunet_diffaug.synthesis.label_generator import LABEL_STAGES
from nnunet_diffaug.synthesis.label_training import train_label_generator
from nnunet_diffaug.synthesis.stage_runner import INIT_STEP, TrainingLog, learning_rate_at, run_stage
from nnunet_diffaug.synthesis.loss_weights import (class_voxel_fractions, class_weights, latent_weight_map,
                                                   voxel_weight_map, weighted_mean)
from nnunet_diffaug.synthesis.outside_data import (UNLABELED_FILE, InitSource, gather,
                                                   unlabeled_only_folder, unlabeled_only_spec)
from nnunet_diffaug.synthesis.plotting import save_montage
from nnunet_diffaug.synthesis.unlabeled_data import (UNLABELED_PREFIX, MixedBatch, MixedSampler,
                                                     UnlabeledPatchSampler, autoencoder_share)
from nnunet_diffaug.synthesis.sampling import autocast
from nnunet_diffaug.synthesis.synthesizer import (CONFIG_FILE, SPEC_FILE, STAGES, Synthesizer, checkpoint_file,
                                                  final_file, resolve_device)

_STAGE_INDEX = {name: i for i, name in enumerate(STAGES)}
SCALE_FACTOR_STREAM = 99  # the label generator draws its own from 98


def _step_seed(seed: int, stage: str, step: int, rank: int = 0) -> int:
    """Process 0 keeps the single-process seeds (so one process is the special case of N); process r > 0
    draws from its own stream."""
    words = [seed, _STAGE_INDEX[stage], step] + ([rank] if rank else [])
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def _seed_initialisation(seed: int, stage: str) -> None:
    """Initial weights must not depend on what ran before in this process (a resumed run skips finished stages)."""
    torch.manual_seed(_step_seed(seed, stage, INIT_STEP))


# ---------------------------------------------------------------------------------------------- run setup

def _prepare_folder(folder: Path, config: SynthesizerConfig, spec: DataSpec, seed: int, overwrite: bool,
                    outside: dict | None = None) -> None:
    """Writes config + spec for a new run; for an existing one, refuses a different config, data or seed.
    ``outside``: the run's unlabelled images and init source (:mod:`outside_data`), part of its data."""
    run = {"spec": spec.to_json(), "seed": seed, **(outside or {})}
    cfg_path, spec_path = folder / CONFIG_FILE, folder / SPEC_FILE
    if cfg_path.is_file() and spec_path.is_file() and not overwrite:
        old_cfg = json.loads(cfg_path.read_text())
        try:  # fields added since (e.g. label_generator) take their preset defaults, as when loading
            old_cfg = json.loads(json.dumps(SynthesizerConfig.from_json(old_cfg, str(cfg_path)).to_json()))
        except DiffAugError:
            pass
        old_run = json.loads(spec_path.read_text())
        check_same_judge(old_run.get(CONSISTENCY_KEY), run.get(CONSISTENCY_KEY), spec_path)
        for key, flag in (("unlabeled", "--unlabeled"), ("init_from", "--init-from")):
            if old_run.get(key) != run.get(key):  # checked first: --unlabeled also turns diffusion.null_label on
                raise DiffAugError(f"{spec_path}: this synthesizer was started "
                                   f"{'with other' if old_run.get(key) and run.get(key) else 'with' if old_run.get(key) else 'without'} "
                                   f"{flag} ({json.dumps(old_run.get(key))[:300]}). Pass the same {flag} to continue "
                                   f"it, or --overwrite to start over.")
        if old_cfg != json.loads(json.dumps(config.to_json())):
            raise DiffAugError(f"{cfg_path}: this synthesizer was started with a different config. Rerun with "
                               f"--preset {cfg_path} to continue it, or pass --overwrite to start over.")
        if old_run != json.loads(json.dumps(run)):
            changed = [k for k in run["spec"] if old_run.get("spec", {}).get(k) != run["spec"][k]]
            if old_run.get("seed") != seed:
                changed.append("seed")
            raise DiffAugError(f"{spec_path}: this synthesizer was started with different data or seed "
                               f"(changed: {changed}). Pass the same --seed to continue, or --overwrite to start over.")
        return
    if overwrite:
        for stage in STAGES + LABEL_STAGES:
            final_file(folder, stage).unlink(missing_ok=True)
            checkpoint_file(folder, stage).unlink(missing_ok=True)
            (folder / f"init_from_{stage}.json").unlink(missing_ok=True)
        (folder / UNLABELED_FILE).unlink(missing_ok=True)
    atomic_write_json(cfg_path, config.to_json())
    atomic_write_json(spec_path, run)


def build_spec(data: FoldData, config: SynthesizerConfig, seed: int) -> DataSpec:
    requested = config.data.patch_size_3d if data.spatial_dims == 3 else config.data.patch_size_2d
    if len(requested) != data.spatial_dims:
        raise DiffAugError(f"config: patch size {list(requested)} has {len(requested)} axes; configuration "
                           f"{data.configuration!r} is {data.spatial_dims}D.")
    shapes = [data.volume_shape(c) for c in data.training_cases]
    shapes = [s[1:] for s in shapes] if data.spatial_dims == 2 else shapes
    lo, hi = data.intensity_range(np.random.default_rng(seed))
    context = fit_fold_context(data, config, seed)
    data.use_context(context)  # from here on, every label map of the fold carries the context classes
    return DataSpec(dataset_name=data.dataset_name, configuration=data.configuration,
                    plans_identifier=data.plans_identifier, fold=data.fold, training_cases=list(data.training_cases),
                    spatial_dims=data.spatial_dims, in_channels=data.in_channels, label_values=data.label_values,
                    normalization_schemes=list(data.cm.normalization_schemes), intensity_min=lo, intensity_max=hi,
                    patch_size=fit_patch_size(list(requested), shapes, config.divisor()),
                    context=None if context is None else context.to_json())


def fit_fold_context(data: FoldData, config: SynthesizerConfig, seed: int):
    """The context model (context.py) fitted on the fold's training cases, or None when the config has none."""
    c = config.context
    if not c.enabled:
        return None
    props = data.plans_manager.foreground_intensity_properties_per_channel
    cases = lambda: ((np.asarray(data.case(cid)[0][...], dtype=np.float32), data.declared_label_volume(cid))  # noqa: E731
                     for cid in data.training_cases)
    return fit_context(c.body, c.clusters, c.body_threshold_hu, cases, data.cm.normalization_schemes[0],
                       props.get("0", props.get(0)), data.outside_class, seed)


# ---------------------------------------------------------------------------------------------- stage loop

def _class_balance(stage: str, cap: float, spec: DataSpec, patches: PatchSampler, extra: dict,
                   log: TrainingLog) -> torch.Tensor | None:
    """Per class-index loss weights of a stage (None when off), recorded in the stage's state."""
    if cap <= 1.0:
        return None
    if patches is None:
        log(f"{stage}: no class-balanced loss without labelled cases")
        return None
    fractions = class_voxel_fractions((patches.data.label_volume(c) for c in patches.cases), spec.num_classes)
    weights = class_weights(fractions, list(range(1, len(spec.label_values))), cap)
    extra["class_weights"] = [float(w) for w in weights]
    log(f"{stage}: class-balanced loss, weight per label value " +
        ", ".join(f"{v}: {w:.2f}" for v, w in zip(spec.label_values, weights)))
    return torch.tensor(weights, dtype=torch.float32)


def _seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- stages

def _train_autoencoder(cfg: SynthesizerConfig, spec: DataSpec, patches: PatchSampler, folder: Path,
                       device: torch.device, seed: int, log: TrainingLog, progress: bool, stop_after: int | None,
                       unlabeled: UnlabeledPatchSampler | None = None, init: InitSource | None = None,
                       outside: dict | None = None):
    acfg = cfg.autoencoder
    _seed_initialisation(seed, "autoencoder")
    ae = build_autoencoder(acfg, spec.spatial_dims, spec.in_channels).to(device)
    if init is not None and not checkpoint_file(folder, "autoencoder").is_file():
        init.load_stage("autoencoder", ae, folder, log)
    sampler = MixedSampler(patches, unlabeled, autoencoder_share(patches, unlabeled))
    if unlabeled is not None:
        log(f"autoencoder: {len(unlabeled.images)} unlabelled image(s) beside {len(sampler.cases)} labelled case(s), "
            f"{sampler.share:.0%} of the samples unlabelled")
    disc = build_discriminator(acfg, spec.spatial_dims, spec.in_channels)
    modules = {"autoencoder": ae}
    optimizers = {"autoencoder": torch.optim.Adam(ae.parameters(), lr=acfg.learning_rate)}
    if disc is not None:
        disc = disc.to(device)
        modules["discriminator"] = disc
        optimizers["discriminator"] = torch.optim.Adam(disc.parameters(), lr=acfg.learning_rate)
    loss_fn = AutoencoderLoss(acfg, disc)
    train_ae = distributed.for_training(ae)
    train_disc = None if disc is None else distributed.for_training(disc)
    extra: dict = dict(outside or {})  # unlabelled sources and init source: recorded in the weight files too
    weights = _class_balance("autoencoder", acfg.class_balance_max_weight, spec, patches, extra, log)

    def step_fn(step: int) -> dict[str, float]:
        s = _step_seed(seed, "autoencoder", step, distributed.rank())
        torch.manual_seed(s)  # the posterior sample inside AutoencoderKL uses the global generator
        batch = sampler.mixed_batch(np.random.default_rng(s), acfg.batch_size)
        images, labels = batch.images.to(device), batch.labels
        ae.train()
        with autocast(device, cfg.mixed_precision):
            recon, z_mu, z_sigma = train_ae(images)
        recon, z_mu, z_sigma = recon.float(), z_mu.float(), z_sigma.float()
        # unlabelled samples carry an all-background label map, whose class weight is 1: plain L1 for them
        voxel_weights = None if weights is None else voxel_weight_map(labels.to(device), weights)
        loss, parts = loss_fn.generator_loss(images, recon, z_mu, z_sigma, step, voxel_weights)
        optimizers["autoencoder"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["autoencoder"].step()
        if loss_fn.adversarial_active(step):
            d_loss, d_parts = loss_fn.discriminator_loss(images, recon, train_disc)
            optimizers["discriminator"].zero_grad(set_to_none=True)
            d_loss.backward()
            optimizers["discriminator"].step()
            parts.update(d_parts)
        return parts

    losses = run_stage("autoencoder", folder, acfg.steps, cfg.checkpoint_every, modules, optimizers, step_fn, extra,
                        ["autoencoder"], log, progress, stop_after)
    return ae.eval(), losses


def _train_diffusion(cfg: SynthesizerConfig, spec: DataSpec, patches: PatchSampler, ae: nn.Module, folder: Path,
                     device: torch.device, seed: int, log: TrainingLog, progress: bool, stop_after: int | None,
                     unlabeled: UnlabeledPatchSampler | None = None, init: InitSource | None = None,
                     outside: dict | None = None):
    dcfg = cfg.diffusion
    _seed_initialisation(seed, "diffusion")
    syn = Synthesizer(cfg, spec, device)
    syn.autoencoder = ae
    if init is not None and not checkpoint_file(folder, "diffusion").is_file():
        init.load_stage("diffusion", syn.model, folder, log)
    sampler = MixedSampler(patches, unlabeled, dcfg.unlabeled_share if patches is not None else 1.0)
    if unlabeled is not None:
        log(f"diffusion: {sampler.share:.0%} of each batch from {len(unlabeled.images)} unlabelled image(s), "
            f"on the 'no label' condition")
    model, scheduler = syn.model, syn.train_scheduler
    optimizers = {"model": torch.optim.Adam(model.parameters(), lr=dcfg.learning_rate)}
    extra: dict = dict(outside or {})  # unlabelled sources and init source: recorded in the weight files too
    cpath = checkpoint_file(folder, "diffusion")
    if cpath.is_file():
        extra["scale_factor"] = float(ckpt.read_state(cpath)["extra"]["scale_factor"])
    else:
        extra["scale_factor"] = distributed.value_of_main_process(
            estimate_scale_factor(ae, sampler, dcfg.scale_factor_batches, dcfg.batch_size, device, seed,
                                  SCALE_FACTOR_STREAM))
        log(f"diffusion: latent scale factor {extra['scale_factor']:.4g} "
            f"(1/std over {dcfg.scale_factor_batches} batches)")

    weights = _class_balance("diffusion", dcfg.class_balance_max_weight, spec, patches, extra, log)
    if dcfg.class_intensity and patches is not None:  # computed once per case (whole volumes), cached by FoldData
        for c in patches.cases:
            patches.data.class_intensity_stats(c)
        log(f"diffusion: class intensity statistics of {len(patches.cases)} training cases")
    if model.tags is not None:  # spacing tags are read relative to the training cases' median
        spacings = ([patches.data.acquisition_spacing(c) for c in patches.cases] if patches is not None
                    else [im.spacing for im in unlabeled.images])  # (learning from unlabelled images only)
        model.tags.set_reference_spacing(np.median(spacings, axis=0).tolist())
    ema = build_ema(model, dcfg.ema_decay)  # after the reference spacing (buffers are copied, not averaged) and
    if dcfg.gradient_checkpointing:         # before checkpointing (a deep copy would keep the wrappers' closures)
        log(f"diffusion: gradient checkpointing of {enable_gradient_checkpointing(model)} UNet blocks")
    modules = {"model": model} if ema is None else {"model": model, EMA_MODULE: ema}
    train_model = distributed.for_training(model)
    ccfg, consistency = cfg.consistency, None
    if ccfg.enabled:
        entry = (outside or {})[CONSISTENCY_KEY]
        consistency = ConsistencyLoss(cfg, spec, entry, ae, scheduler, device, weights)
        log(f"diffusion: segmentation-consistency loss x {ccfg.weight:g} on samples with t <= {ccfg.max_timestep:g} "
            f"of {dcfg.num_train_timesteps}, every {ccfg.every} step(s); judge {entry['judge']} "
            f"({entry['checkpoint']}, sha256 {entry['judge_sha256'][:16]}...)"
            + (", cross-entropy class-balanced" if weights is not None else ""))

    def step_fn(step: int) -> dict[str, float]:
        s = _step_seed(seed, "diffusion", step, distributed.rank())
        gen = torch.Generator().manual_seed(s)
        rng = np.random.default_rng(s)
        batch = sampler.mixed_batch(rng, dcfg.batch_size)
        images, labels = batch.images.to(device), batch.labels.to(device)
        condition, no_label = _training_condition(syn, patches, images, labels, batch.case_ids, rng, batch)
        condition = condition.to(device)
        with autocast(device, cfg.mixed_precision):
            z = encode_mean(ae, images).float() * extra["scale_factor"]
        noise = torch.randn(z.shape, generator=gen).to(device)
        t = training_timesteps(scheduler, z, gen)
        noisy = scheduler.add_noise(original_samples=z, noise=noise, timesteps=t)
        for group in optimizers["model"].param_groups:
            group["lr"] = learning_rate_at(step, dcfg.learning_rate, dcfg.steps, dcfg.lr_schedule, dcfg.warmup_steps)
        model.train()
        with autocast(device, cfg.mixed_precision):
            pred = train_model(noisy, t, condition)
        target = diffusion_target(scheduler, z, noise, t).float()
        mse = torch.nn.functional.mse_loss(pred.float(), target)
        parts = {"mse": float(mse.detach())}  # plain MSE is logged either way, so curves stay comparable
        loss = mse
        if weights is not None:
            loss = weighted_mean((pred.float() - target) ** 2, latent_weight_map(labels, weights, z.shape[2:]))
            parts["weighted_mse"] = float(loss.detach())
        if consistency is not None:  # logged every step, None where not measured, so the curve keeps its steps
            parts["consistency"] = None
            chosen = consistency.selected(t, no_label) if consistency.applies(step) else None
            if chosen is not None and bool(chosen.any()):
                cons = consistency(noisy, pred, t, labels, extra["scale_factor"], chosen)
                loss = loss + ccfg.weight * cons
                parts["consistency"] = float(cons.detach())
        optimizers["model"].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # guards against the NaN blow-ups users report
        optimizers["model"].step()
        update_ema(ema, model)
        return parts

    losses = run_stage("diffusion", folder, dcfg.steps, cfg.checkpoint_every, modules, optimizers,
                        step_fn, extra, list(modules), log, progress, stop_after)
    syn.scale_factor = extra["scale_factor"]
    model.eval()
    if ema is not None:  # sample (montages, the returned synthesizer) from the EMA, as loading does
        syn.model = ema.module.eval()
    return syn, losses


def _training_condition(syn: Synthesizer, patches: PatchSampler, images: torch.Tensor, labels: torch.Tensor,
                        case_ids: list[str], rng: np.random.Generator,
                        batch: MixedBatch | None = None) -> tuple[Condition, torch.Tensor | None]:
    """The condition of a training batch, with the configured dropouts: image edges, spacing tags and class
    intensities are left out for a random share of samples, so sampling works without them. Unlabelled samples
    (and, with diffusion.label_dropout, that share of labelled ones) get the "no label" condition; returned
    beside the condition: which samples those are ((B,) booleans, None when none can be)."""
    dcfg = syn.config.diffusion
    unlabeled = None if batch is None else batch.unlabeled
    use_image = torch.from_numpy(rng.random(len(case_ids)) >= dcfg.edge_image_dropout)
    stats = None
    if dcfg.class_intensity:  # the whole case's statistics, as at synthesis (a crop's own would leak its pixels)
        unknown = np.full((syn.spec.num_classes, syn.spec.in_channels, 2), np.nan, dtype=np.float32)
        stats = torch.from_numpy(np.stack([unknown if c.startswith(UNLABELED_PREFIX)
                                           else patches.data.class_intensity_stats(c) for c in case_ids]))
        stats[torch.from_numpy(rng.random(len(case_ids)) < dcfg.class_intensity_dropout)] = float("nan")
    if dcfg.label_dropout > 0:
        dropped = torch.from_numpy(rng.random(len(case_ids)) < dcfg.label_dropout)
        unlabeled = dropped if unlabeled is None else unlabeled | dropped
    spatial = syn.condition(labels, images, None, stats, use_image, unlabeled).spatial
    spacing = None
    if dcfg.tag_conditioning:
        spacing = torch.tensor(batch.spacings if batch is not None else
                               [patches.data.acquisition_spacing(c) for c in case_ids], dtype=torch.float32)
        spacing[torch.from_numpy(rng.random(len(case_ids)) < dcfg.tag_dropout)] = float("nan")
    return Condition(spatial, spacing), unlabeled


# ---------------------------------------------------------------------------------------------- montages

@torch.no_grad()
def _montages(stage: str, syn: Synthesizer, patches: PatchSampler, folder: Path, seed: int) -> None:
    n = syn.config.montage_cases
    images, labels, case_ids = patches.batch_with_cases(np.random.default_rng([seed, 77]), n)
    real = images[:, 0].numpy()
    lab = labels[:, 0].numpy()
    vmin, vmax = float(syn.spec.intensity_min[0]), float(syn.spec.intensity_max[0])
    if stage == "autoencoder":
        recon = syn.autoencoder.reconstruct(images.to(syn.device))  # decodes the posterior mean
        rows = [("real", list(real)), ("reconstruction", list(recon[:, 0].cpu().numpy()))]
    else:
        gen = torch.Generator().manual_seed(seed)
        spacing = [patches.data.acquisition_spacing(c) for c in case_ids]
        stats = ([patches.data.class_intensity_stats(c) for c in case_ids]
                 if syn.config.diffusion.class_intensity else None)
        fake = syn.generate(lab, syn.sampler(), gen, edge_images=images.numpy(), spacing=spacing, class_stats=stats)
        rows = [("real", list(real)), ("generated", list(fake[:, 0]))]
    save_montage(folder / f"{stage}_montage.png", rows, list(lab), syn.spec.num_classes,
                 f"{stage}: {syn.spec.dataset_name} {syn.spec.configuration} fold {syn.spec.fold}", vmin, vmax)


# ---------------------------------------------------------------------------------------------- entry

def train_synthesizer(dataset: str | int, configuration: str, fold: int, config: SynthesizerConfig,
                      plans_identifier: str = "nnUNetPlans", device: str = "auto", seed: int = 0,
                      overwrite: bool = False, progress: bool = True, verbose: bool = False,
                      stop_after: int | None = None, unlabeled: list[str] | None = None,
                      init_from: str | None = None, unlabeled_only: bool = False) -> Path:
    """Trains (or resumes) the synthesizer of one fold. Returns its folder. Started by torchrun, trains with
    all its processes together (see :mod:`distributed`).

    ``stop_after``: stop each unfinished stage after this many steps (with a checkpoint), as if killed.
    ``unlabeled``: folders of unlabelled images or raw datasets (:mod:`nnunet_diffaug.unlabeled`);
    ``init_from``: a trained synthesizer's folder to start every stage from (:mod:`outside_data`).
    ``unlabeled_only``: learn from the ``unlabeled`` images alone, no labelled case (``fold`` is not used): a
    synthesizer blind to every labelled case, to start each fold's from (``init_from``); it cannot synthesize.
    """
    with distributed.process_group(resolve_device(device)) as dev:
        return _train_synthesizer(dataset, configuration, fold, config, plans_identifier, dev, seed, overwrite,
                                  progress, verbose, stop_after, unlabeled, init_from, unlabeled_only)


def _train_synthesizer(dataset: str | int, configuration: str, fold: int, config: SynthesizerConfig,
                       plans_identifier: str, dev: torch.device, seed: int, overwrite: bool, progress: bool,
                       verbose: bool, stop_after: int | None, unlabeled: list[str] | None = None,
                       init_from: str | None = None, unlabeled_only: bool = False) -> Path:
    if unlabeled_only and not unlabeled:
        raise DiffAugError("--unlabeled-only needs --unlabeled SOURCE ...: the images to learn from.")
    if unlabeled_only and config.context.enabled:
        raise DiffAugError("--unlabeled-only: the config's context classes are fitted on a fold's labelled cases, and "
                           "this run has none. Train the shared synthesizer without \"context\"; each fold's "
                           "synthesizer adds it (diffaug_train_synthesizer ... --init-from FOLDER with context on).")
    if unlabeled_only and config.consistency.enabled:
        raise DiffAugError("--unlabeled-only: the config's segmentation-consistency loss compares the painted image with "
                           "its label map, and this run has none. Train the shared synthesizer without "
                           "\"consistency\"; each fold's synthesizer adds it (--init-from FOLDER with it on).")
    with distributed.main_process_first():  # it may write nnU-Net's default split, which the others then read
        data = FoldData(dataset, configuration, None if unlabeled_only else fold, plans_identifier)  # None: no fold
    judge = open_judge(config, data)  # checked before anything is written; None when the loss is off
    folder = (unlabeled_only_folder(data.dataset_name, configuration) if unlabeled_only
              else paths.synthesizer_folder(data.dataset_name, configuration, fold))
    early_log: list[str] = []  # the log file is opened once the folder is prepared
    if judge and (note := weak_judge_note(judge, data)):
        early_log.append(note)
    with distributed.main_process_first():  # the main process preprocesses new unlabelled images, the others reuse
        outside, config = gather(data, config, folder, unlabeled, init_from, early_log.append,
                                 progress and distributed.is_main_process(), unlabeled_only)
    folder.mkdir(parents=True, exist_ok=True)  # after gather's checks: a refused run leaves no folder behind
    run_entries = {**outside.run_entries(), **({CONSISTENCY_KEY: judge} if judge else {})}
    # the lock keeps other runs out; the processes of this run share it through the main process
    lock = folder_lock(folder, timeout_s=5.0, name=".train.lock") if distributed.is_main_process() \
        else contextlib.nullcontext()
    with lock:
        spec = build_spec(data, config, seed) if not unlabeled_only else unlabeled_only_spec(data, config, outside.images)
        if distributed.is_main_process():
            _prepare_folder(folder, config, spec, seed, overwrite, run_entries)
            outside.write(folder, data)
        distributed.barrier()  # the others look into the folder only once it is prepared (--overwrite empties it)
        log = TrainingLog(folder / "training_log.txt", verbose)
        log(f"training synthesizer: {data.dataset_name} {configuration} "
            f"{'(unlabelled images only)' if unlabeled_only else f'fold {fold}'}, {len(spec.training_cases)} "
            f"training cases, patch {spec.patch_size}, device {dev}, seed {seed}, config {config.base}"
            + (f", {distributed.world_size()} processes" if distributed.is_distributed() else ""))
        for line in early_log:
            log(line)
        if outside.init is not None:
            init = outside.init  # fold -1: an --unlabeled-only synthesizer, which has no fold
            trained_on = f"{init.dataset_name}, unlabelled images only" if init.fold < 0 else \
                f"{init.dataset_name} fold {init.fold}"
            log(f"init-from: {init.folder} ({trained_on}, weights sha256 {init.weights_sha256[:16]}, label set "
                f"{'same' if init.same_labels else 'differs'})")
        _seed_everything(seed)
        patches = (None if unlabeled_only else
                   PatchSampler(data, spec.patch_size, config.data.foreground_crop_probability))
        unl_sampler = (UnlabeledPatchSampler(outside.images, spec.patch_size, spec.spatial_dims)
                       if outside.images else None)

        if final_file(folder, "autoencoder").is_file():
            log("autoencoder: finished earlier, skipped")
            ae = build_autoencoder(config.autoencoder, spec.spatial_dims, spec.in_channels).to(dev)
            tensors, _ = ckpt.load_checkpoint(final_file(folder, "autoencoder"), dev)
            ae.load_state_dict(ckpt.unprefixed("autoencoder", tensors))
            ae.eval()
        else:
            ae, _ = _train_autoencoder(config, spec, patches, folder, dev, seed, log, progress, stop_after,
                                       unl_sampler, outside.init, outside.run_entries())
            if not final_file(folder, "autoencoder").is_file():
                return folder  # stopped early on request
            if distributed.is_main_process() and patches is not None:
                syn = Synthesizer(config, spec, dev)
                syn.autoencoder = ae
                _montages("autoencoder", syn, patches, folder, seed)
        for p in ae.parameters():
            p.requires_grad_(False)

        if final_file(folder, "diffusion").is_file():
            log("diffusion: finished earlier, skipped")
        else:
            syn, _ = _train_diffusion(config, spec, patches, ae, folder, dev, seed, log, progress, stop_after,
                                      unl_sampler, outside.init, run_entries)
            if not final_file(folder, "diffusion").is_file():
                return folder  # stopped early on request
            if distributed.is_main_process() and patches is not None:
                _montages("diffusion", syn, patches, folder, seed)
        if config.label_generator.enabled and unlabeled_only:
            log("label generator: not trained (no label maps among unlabelled images)")
        elif config.label_generator.enabled:
            if not train_label_generator(config, spec, data, folder, dev, seed, log, progress, stop_after,
                                         outside.init):
                return folder  # stopped early on request
        log(f"done: {folder}")
    return folder
