"""The synthesizer's configuration: one typed dataclass, presets, and a strict JSON round trip.

A config describes models and training, never data: everything that comes from the dataset
(channels, labels, spatial dims, intensity range) lives in :class:`synthesis.data.DataSpec`.

Custom configs are JSON files holding any subset of the fields; missing fields come from the
preset named by their ``"base"`` key (``"tiny"`` when absent). Unknown keys are refused, so a
typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnunet_diffaug.errors import DiffAugError

CONDITIONINGS = ("spade", "controlnet")
SAMPLERS = ("dpmpp", "unipc", "ddim", "ddpm", "rflow")
OBJECTIVES = ("ddpm", "rflow")
DDPM_SAMPLERS = ("dpmpp", "unipc", "ddim", "ddpm")   # samplers for models trained with objective "ddpm"


@dataclass
class DataConfig:
    patch_size_3d: tuple[int, ...] = (32, 32, 32)   # training crop; capped at the volume size
    patch_size_2d: tuple[int, ...] = (64, 64)
    foreground_crop_probability: float = 0.67       # crops centred on a random labelled voxel (class balanced)


@dataclass
class AutoencoderConfig:
    channels: tuple[int, ...] = (16, 32)            # one entry per level; latent is 2**(len-1) times smaller
    latent_channels: int = 3
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] = (False, False)
    nonlocal_attention: bool = False                # MONAI's mid-block attention; costly at 3D sizes
    norm_num_groups: int = 8
    kl_weight: float = 1e-6
    adversarial_weight: float = 0.0                 # > 0 turns on a PatchDiscriminator
    adversarial_start_step: int = 0                 # warm-up steps before the adversarial loss kicks in
    discriminator_channels: int = 32
    discriminator_layers: int = 2
    class_balance_max_weight: float = 1.0           # > 1: L1 weight of rare classes' voxels, up to this (loss_weights.py)
    learning_rate: float = 1e-3
    batch_size: int = 2
    steps: int = 300


@dataclass
class DiffusionConfig:
    conditioning: str = "spade"                     # "spade" or "controlnet"
    channels: tuple[int, ...] = (16, 32, 32)
    attention_levels: tuple[bool, ...] = (False, False, False)
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    num_head_channels: int = 8
    spade_hidden_channels: int = 32
    controlnet_embedding_channels: tuple[int, ...] = (16, 32)   # len == len(autoencoder.channels): full res -> latent
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    objective: str = "ddpm"                         # "ddpm" (noise schedule + prediction_type) or "rflow" (rectified flow)
    prediction_type: str = "v_prediction"           # ddpm only: or "epsilon"; v makes the model use the labels at high noise
    rflow_timesteps: str = "logit-normal"           # rflow training-time sampling: "logit-normal" or "uniform"
    ema_decay: float = 0.0                          # > 0: keep an EMA of the weights (sampled from by default); 0 = off
    gradient_checkpointing: bool = False            # recompute UNet blocks in backward: less memory, ~30% slower
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"                     # "cosine" (decays to 10% at the end) or "constant"
    warmup_steps: int = 20
    batch_size: int = 4
    steps: int = 400
    scale_factor_batches: int = 20                  # batches used to estimate 1/std of the latents
    class_balance_max_weight: float = 1.0           # > 1: loss weight of rare classes, up to this (loss_weights.py)
    edge_hint: bool = False                         # DiffBoost (Zhang et al., IEEE TMI 2024): an edge-map channel beside the labels
    edge_image_dropout: float = 0.5                 # share of training samples with label boundaries only
    tag_conditioning: bool = False                  # channel-name + acquisition-spacing embeddings (FiLM via SPADE)
    tag_dim: int = 8                                # constant condition channels the tag vector fills
    tag_dropout: float = 0.1                        # share of training samples without the spacing tag
    class_intensity: bool = False                   # per-class mean/sd maps of the image beside the labels (class_stats.py)
    class_intensity_dropout: float = 0.15           # share of training samples without them (sampling works without)
    # Unlabelled images (--unlabeled) train with a learned "no label" condition, the null condition of
    # classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", arXiv 2207.12598, 2022).
    null_label: bool = False                        # one more condition channel, 1 = "no label map"; training turns
                                                    # it on with --unlabeled or label_dropout > 0
    unlabeled_share: float = 0.5                    # share of each diffusion batch drawn from the unlabelled images
    label_dropout: float = 0.0                      # share of labelled samples trained on the "no label" condition


@dataclass
class SamplingConfig:
    sampler: str = "dpmpp"
    steps: int = 10
    decode_overlap: float = 0.25                    # sliding-window VAE decoding, gaussian blending
    diffusion_windows: bool = True                  # denoise latents larger than the training patch's in windows
    diffusion_overlap: float = 0.25                 # overlap of those windows (gaussian blending)
    rotate_degrees: float = 10.0                    # label-map augmentation: in-plane rotation range (+-)
    scale_range: float = 0.1                        # isotropic zoom in [1 - r, 1 + r]
    translate_fraction: float = 0.05                # shift of up to this fraction of each axis
    label_guidance: float = 1.0                     # classifier-free guidance weight on the label map: 1 = plain
                                                    # conditional; > 1 needs a model with diffusion.null_label


@dataclass
class LabelGeneratorConfig:
    """Latent diffusion over label maps (Ruschke et al., arXiv 2411.01351, 2024): a KL autoencoder on one-hot labels, then a UNet over its
    latents conditioned on foreground volume fractions, with classifier-free guidance."""
    enabled: bool = False                           # off in tiny so the image-only CPU runs stay fast
    max_shape_3d: tuple[int, ...] = (96, 112, 96)   # generated maps: the median training shape, capped at this
    max_shape_2d: tuple[int, ...] = (256, 256)
    autoencoder_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 3
    kl_weight: float = 1e-6
    dice_weight: float = 1.0                        # soft Dice beside cross-entropy keeps small classes alive
    autoencoder_learning_rate: float = 1e-3
    autoencoder_batch_size: int = 4
    autoencoder_steps: int = 300
    channels: tuple[int, ...] = (16, 32, 32)
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    condition_dropout: float = 0.2                  # share of training steps on the null condition (CFG)
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    batch_size: int = 4
    steps: int = 400
    scale_factor_batches: int = 20
    sampling_steps: int = 20
    guidance: float = 1.0                           # default guidance weight w (1 = plain conditional sampling)
    ema_decay: float = 0.0                          # > 0: EMA of the label diffusion weights, sampled from; 0 = off

    def divisor(self) -> int:
        """Label canvases must be multiples of this: label autoencoder downsampling times UNet downsampling."""
        return 2 ** (len(self.autoencoder_channels) - 1) * 2 ** (len(self.channels) - 1)

    def latent_factor(self) -> int:
        return 2 ** (len(self.autoencoder_channels) - 1)


@dataclass
class ContextConfig:
    """Context classes where the labels say "background" (context.py): off unless body or clusters is set."""
    body: bool = False                              # a body-envelope class (MAISI's, Guo et al., WACV 2025)
    clusters: int = 0                               # K intensity-cluster classes (SynthSeg's generation classes);
                                                    # inside the body when body is on; 0 = none
    body_threshold_hu: float = -500.0               # CT: the body is above this; other modalities: Otsu

    @property
    def enabled(self) -> bool:
        return self.body or self.clusters > 0


@dataclass
class ConsistencyConfig:
    """Segmentation-consistency loss (consistency.py), after ControlNet++ (Li et al., "ControlNet++: Improving
    Conditional Controls with Efficient Consistency Feedback", ECCV 2024): nnU-Net's Dice + cross-entropy between
    the conditioning label map and a frozen real-trained nnU-Net's reading of the one-step denoised image. Off
    unless weight > 0."""
    judge: str = ""                                 # nnU-Net model folder (Trainer__Plans__Configuration) trained
                                                    # on the same fold's real cases, same plans and configuration
    weight: float = 0.0                             # 0 = off; the loss is added to the diffusion loss times this
    max_timestep: float = 200.0                     # only samples with t <= this (of num_train_timesteps; rflow:
                                                    # the same fraction of its time axis)
    every: int = 1                                  # applied every k-th step

    @property
    def enabled(self) -> bool:
        return self.weight > 0


@dataclass
class SynthesizerConfig:
    base: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    label_generator: LabelGeneratorConfig = field(default_factory=LabelGeneratorConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    checkpoint_every: int = 50                      # steps between resumable checkpoints
    mixed_precision: bool = True                    # bf16 autocast on CUDA (training and sampling); CPU stays fp32
    montage_cases: int = 4

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict, where: str = "config") -> "SynthesizerConfig":
        if not isinstance(obj, dict):
            raise DiffAugError(f"{where}: a synthesizer config must be a JSON object.")
        base_name = obj.get("base", "tiny")
        if base_name not in PRESETS:
            raise DiffAugError(f"{where}: unknown base preset {base_name!r}; choose one of {sorted(PRESETS)}.")
        cfg = _merge(PRESETS[base_name](), obj, where)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        ae, dm, s = self.autoencoder, self.diffusion, self.sampling
        problems = []
        if dm.conditioning not in CONDITIONINGS:
            problems.append(f"diffusion.conditioning must be one of {CONDITIONINGS}, not {dm.conditioning!r}")
        if s.sampler not in SAMPLERS:
            problems.append(f"sampling.sampler must be one of {SAMPLERS}, not {s.sampler!r}")
        if dm.lr_schedule not in ("cosine", "constant"):
            problems.append(f"diffusion.lr_schedule must be 'cosine' or 'constant', not {dm.lr_schedule!r}")
        if dm.prediction_type not in ("epsilon", "v_prediction"):
            problems.append("diffusion.prediction_type must be 'epsilon' or 'v_prediction'")
        if dm.objective not in OBJECTIVES:
            problems.append(f"diffusion.objective must be one of {OBJECTIVES}, not {dm.objective!r}")
        elif (dm.objective == "rflow") != (s.sampler == "rflow"):
            problems.append(f"sampling.sampler {s.sampler!r} does not fit diffusion.objective {dm.objective!r}: "
                            f"a rectified-flow model samples with 'rflow', a ddpm model with one of {DDPM_SAMPLERS}")
        if dm.rflow_timesteps not in ("logit-normal", "uniform"):
            problems.append(f"diffusion.rflow_timesteps must be 'logit-normal' or 'uniform', not {dm.rflow_timesteps!r}")
        if not 0.0 <= dm.ema_decay < 1.0:
            problems.append(f"diffusion.ema_decay must be in [0, 1) (0 = off), not {dm.ema_decay}")
        for name in ("decode_overlap", "diffusion_overlap"):
            if not 0.0 <= getattr(s, name) < 1.0:
                problems.append(f"sampling.{name} must be in [0, 1), not {getattr(s, name)}")
        if len(ae.attention_levels) != len(ae.channels):
            problems.append("autoencoder.attention_levels needs one entry per autoencoder.channels entry")
        if len(dm.attention_levels) != len(dm.channels):
            problems.append("diffusion.attention_levels needs one entry per diffusion.channels entry")
        if dm.conditioning == "controlnet" and len(dm.controlnet_embedding_channels) != len(ae.channels):
            problems.append("diffusion.controlnet_embedding_channels needs len(autoencoder.channels) entries, "
                            "so that the label map is embedded from full resolution down to the latent size")
        for name, chans, groups in (("autoencoder", ae.channels, ae.norm_num_groups),
                                    ("diffusion", dm.channels, dm.norm_num_groups)):
            if any(c % groups for c in chans):
                problems.append(f"{name}.channels {list(chans)} must be multiples of norm_num_groups={groups}")
        for name, value in (("autoencoder.steps", ae.steps), ("diffusion.steps", dm.steps),
                            ("autoencoder.batch_size", ae.batch_size), ("diffusion.batch_size", dm.batch_size),
                            ("checkpoint_every", self.checkpoint_every), ("sampling.steps", s.steps),
                            ("diffusion.scale_factor_batches", dm.scale_factor_batches)):
            if value < 1:
                problems.append(f"{name} must be >= 1, not {value}")
        for name in ("unlabeled_share", "label_dropout"):
            if not 0.0 <= getattr(dm, name) < 1.0:
                problems.append(f"diffusion.{name} must be in [0, 1), not {getattr(dm, name)}")
        if s.label_guidance < 0:
            problems.append(f"sampling.label_guidance must be >= 0, not {s.label_guidance}")
        for name in ("edge_image_dropout", "tag_dropout", "class_intensity_dropout"):
            if not 0.0 <= getattr(dm, name) <= 1.0:
                problems.append(f"diffusion.{name} must be in [0, 1], not {getattr(dm, name)}")
        for name, stage in (("autoencoder", ae), ("diffusion", dm)):
            if stage.class_balance_max_weight < 1.0:
                problems.append(f"{name}.class_balance_max_weight must be >= 1 (1 = off), not "
                                f"{stage.class_balance_max_weight}")
        if dm.tag_dim < 1:
            problems.append(f"diffusion.tag_dim must be >= 1, not {dm.tag_dim}")
        if not 0 <= self.context.clusters <= 32:
            problems.append(f"context.clusters must be in [0, 32] (0 = none), not {self.context.clusters}")
        problems += _label_generator_problems(self.label_generator)
        problems += _consistency_problems(self.consistency, dm.num_train_timesteps)
        if problems:
            raise DiffAugError(f"{where}: " + "; ".join(problems) + ".")

    def divisor(self) -> int:
        """Image sizes must be multiples of this: autoencoder downsampling times UNet downsampling."""
        return 2 ** (len(self.autoencoder.channels) - 1) * 2 ** (len(self.diffusion.channels) - 1)

    def latent_factor(self) -> int:
        return 2 ** (len(self.autoencoder.channels) - 1)


def _label_generator_problems(lg: LabelGeneratorConfig) -> list[str]:
    problems = []
    for name, chans in (("autoencoder_channels", lg.autoencoder_channels), ("channels", lg.channels)):
        if not chans or any(c % lg.norm_num_groups for c in chans):
            problems.append(f"label_generator.{name} {list(chans)} must be non-empty multiples of "
                            f"label_generator.norm_num_groups={lg.norm_num_groups}")
    if len(lg.max_shape_2d) != 2 or len(lg.max_shape_3d) != 3 or min(*lg.max_shape_2d, *lg.max_shape_3d) < 1:
        problems.append("label_generator.max_shape_2d/max_shape_3d need 2/3 positive sizes")
    if not 0.0 <= lg.ema_decay < 1.0:
        problems.append(f"label_generator.ema_decay must be in [0, 1) (0 = off), not {lg.ema_decay}")
    if not 0.0 <= lg.condition_dropout < 1.0:
        problems.append(f"label_generator.condition_dropout must be in [0, 1), not {lg.condition_dropout}")
    for name in ("autoencoder_steps", "autoencoder_batch_size", "steps", "batch_size", "scale_factor_batches",
                 "sampling_steps", "latent_channels"):
        if getattr(lg, name) < 1:
            problems.append(f"label_generator.{name} must be >= 1, not {getattr(lg, name)}")
    if lg.guidance < 0:
        problems.append(f"label_generator.guidance must be >= 0, not {lg.guidance}")
    return problems


def _consistency_problems(c: ConsistencyConfig, num_train_timesteps: int) -> list[str]:
    problems = []
    if not isinstance(c.judge, str):
        problems.append(f"consistency.judge must be the path of an nnU-Net model folder (a string), not {c.judge!r}")
    if not (math.isfinite(c.weight) and c.weight >= 0):
        problems.append(f"consistency.weight must be a finite number >= 0 (0 = off), not {c.weight}")
    elif c.weight > 0 and isinstance(c.judge, str) and not c.judge.strip():
        problems.append("consistency.weight > 0 needs consistency.judge: the folder of an nnU-Net model trained on the "
                        "same fold's real cases (nnUNet_results/DatasetX/Trainer__Plans__Configuration)")
    elif c.weight == 0 and isinstance(c.judge, str) and c.judge.strip():
        problems.append(f"consistency.judge is set ({c.judge}) but consistency.weight is 0, which turns the loss off; "
                        f"give a weight > 0 (e.g. 0.1) or leave the judge out")
    if not (math.isfinite(c.max_timestep) and 0 < c.max_timestep <= num_train_timesteps):
        problems.append(f"consistency.max_timestep must lie in (0, diffusion.num_train_timesteps = "
                        f"{num_train_timesteps}], not {c.max_timestep}")
    if c.every < 1:
        problems.append(f"consistency.every must be >= 1 (apply the loss every k-th step), not {c.every}")
    return problems


# Keys that earlier versions wrote into every config.json: read with the value that meant "off" (so older
# synthesizers still load and resume), refused with the reason otherwise.
_REMOVED_KEYS = {
    "AutoencoderConfig": {"perceptual_weight": (0, 0.0), "perceptual_weights_path": (None, "")},
}
_PERCEPTUAL_REMOVED = ("was removed: a perceptual loss needs pretrained network weights, which this project never "
                       "downloads, and no version ever trained with one; delete the key (the autoencoder trains "
                       "with L1 + KL and, optionally, adversarial_weight)")


def _without_removed_keys(instance, obj: dict, where: str) -> dict:
    removed = _REMOVED_KEYS.get(type(instance).__name__, {})
    for key in set(obj) & set(removed):
        if obj[key] not in removed[key]:
            raise DiffAugError(f"{where}: {key} = {obj[key]!r} {_PERCEPTUAL_REMOVED}.")
    return {k: v for k, v in obj.items() if k not in removed}


def _merge(instance, obj: dict, where: str):
    """Returns a copy of dataclass ``instance`` with the JSON ``obj`` applied, refusing unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(instance)}
    obj = _without_removed_keys(instance, obj, where)
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise DiffAugError(f"{where}: unknown key(s) {unknown} in {type(instance).__name__}; "
                           f"known keys are {sorted(fields)}.")
    updates: dict[str, Any] = {}
    for name, value in obj.items():
        current = getattr(instance, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise DiffAugError(f"{where}: {name!r} must be a JSON object.")
            updates[name] = _merge(current, value, f"{where} [{name}]")
        elif isinstance(current, tuple):
            if not isinstance(value, (list, tuple)):
                raise DiffAugError(f"{where}: {name!r} must be a list, not {value!r}.")
            updates[name] = tuple(value)
        elif isinstance(current, bool) and not isinstance(value, bool):
            raise DiffAugError(f"{where}: {name!r} must be true or false, not {value!r}.")
        elif isinstance(current, (int, float)) and not isinstance(current, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DiffAugError(f"{where}: {name!r} must be a number, not {value!r}.")
        elif isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
            if value != int(value):
                raise DiffAugError(f"{where}: {name!r} must be an integer, not {value!r}.")
            updates[name] = int(value)
        else:
            updates[name] = value
    return dataclasses.replace(instance, **updates)


# ---------------------------------------------------------------------------------------------- presets

def tiny() -> SynthesizerConfig:
    """CPU-sized: a few minutes on 2 cores on small volumes; what the tests use."""
    return SynthesizerConfig(base="tiny")


def default() -> SynthesizerConfig:
    """GPU-sized after the anchors (MAISI-like 4x compression, 4 latent channels; UNet [128, 256, 512])."""
    return SynthesizerConfig(
        base="default",
        data=DataConfig(patch_size_3d=(96, 96, 96), patch_size_2d=(256, 256)),
        autoencoder=AutoencoderConfig(channels=(64, 128, 256), latent_channels=4, num_res_blocks=2,
                                      attention_levels=(False, False, False), norm_num_groups=32,
                                      kl_weight=1e-6, adversarial_weight=0.01, adversarial_start_step=5000,
                                      discriminator_channels=64, discriminator_layers=3,
                                      learning_rate=1e-4, batch_size=2, steps=30000),
        diffusion=DiffusionConfig(channels=(128, 256, 512), attention_levels=(False, True, True),
                                  num_res_blocks=2, norm_num_groups=32, num_head_channels=64,
                                  spade_hidden_channels=128, controlnet_embedding_channels=(32, 64, 128),
                                  learning_rate=1e-4, warmup_steps=500, batch_size=4, steps=50000,
                                  scale_factor_batches=50, ema_decay=0.999),
        sampling=SamplingConfig(sampler="dpmpp", steps=20),
        label_generator=LabelGeneratorConfig(enabled=True, autoencoder_channels=(32, 64, 128), latent_channels=3,
                                             autoencoder_learning_rate=1e-4, autoencoder_batch_size=2,
                                             autoencoder_steps=20000, channels=(64, 128, 256), num_res_blocks=2,
                                             norm_num_groups=32, learning_rate=1e-4, warmup_steps=500,
                                             batch_size=4, steps=40000, scale_factor_batches=50, guidance=2.0,
                                             ema_decay=0.999),
        checkpoint_every=1000,
        montage_cases=8,
    )


PRESETS = {"tiny": tiny, "default": default}


def load_config(preset_or_path: str) -> SynthesizerConfig:
    """A preset name (``tiny``, ``default``) or the path of a JSON config file."""
    if preset_or_path in PRESETS:
        cfg = PRESETS[preset_or_path]()
        cfg.validate(f"preset {preset_or_path!r}")
        return cfg
    path = Path(preset_or_path)
    if not path.is_file():
        raise DiffAugError(f"{path}: no such config file, and not a preset name (presets: {sorted(PRESETS)}).")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DiffAugError(f"{path} is not valid JSON: {e}") from None
    return SynthesizerConfig.from_json(obj, str(path))
