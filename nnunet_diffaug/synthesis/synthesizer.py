"""A trained synthesizer: its files, loading them, and label map -> image in normalised space.

Folder layout (``paths.synthesizer_folder(dataset, configuration, fold)``)::

    config.json                         the SynthesizerConfig (reusable as ``--preset path/to/config.json``)
    synthesizer.json                    DataSpec + seed: what it was trained on
    autoencoder.safetensors             final weights of stage 1 (+ JSON state in the metadata)
    diffusion.safetensors               final weights of stage 2, incl. the latent scale factor (``model.*``),
                                        and their EMA (``ema_model.module.*``) when diffusion.ema_decay > 0
    <stage>_checkpoint.safetensors      resumable state of an unfinished stage (weights + optimizers)
    <stage>_losses.png, <stage>_montage.png, training_log.txt
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.synthesis.autoencoder import build_autoencoder
from nnunet_diffaug.synthesis.checkpoint import final_file, load_checkpoint, unprefixed
from nnunet_diffaug.synthesis.conditioning import Condition, spatial_condition, with_null_label
from nnunet_diffaug.synthesis.config import SynthesizerConfig
from nnunet_diffaug.synthesis.data import DataSpec, pad_to
from nnunet_diffaug.synthesis.ema import ema_weights
from nnunet_diffaug.synthesis.image_generator import GuidedModel, build_image_generator, build_train_scheduler
from nnunet_diffaug.synthesis.sampling import (Sampler, autocast, enable_fast_cpu_convolutions, generate_images,
                                               padded_shape)

CONFIG_FILE = "config.json"
SPEC_FILE = "synthesizer.json"
STAGES = ("autoencoder", "diffusion")


def checkpoint_file(folder: Path, stage: str) -> Path:
    return Path(folder) / f"{stage}_checkpoint.safetensors"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DiffAugError("-device cuda was requested but torch sees no CUDA device; use -device cpu.")
    if device == "mps" and not torch.backends.mps.is_available():
        raise DiffAugError("-device mps was requested but torch has no MPS backend here; use -device cpu.")
    return torch.device(device)


def read_run_files(folder: Path) -> tuple[SynthesizerConfig, DataSpec, int]:
    folder = Path(folder)
    for name in (CONFIG_FILE, SPEC_FILE):
        if not (folder / name).is_file():
            raise DiffAugError(f"{folder / name} does not exist: no synthesizer was trained here. Run "
                               f"diffaug_train_synthesizer for this dataset, configuration and fold first.")
    try:
        cfg_obj = json.loads((folder / CONFIG_FILE).read_text())
        spec_obj = json.loads((folder / SPEC_FILE).read_text())
    except json.JSONDecodeError as e:
        raise DiffAugError(f"{folder}: config.json or synthesizer.json is not valid JSON ({e}).") from None
    cfg = SynthesizerConfig.from_json(cfg_obj, str(folder / CONFIG_FILE))
    spec = DataSpec.from_json(spec_obj.get("spec", {}), str(folder / SPEC_FILE))
    return cfg, spec, int(spec_obj.get("seed", 0))


class Synthesizer:
    """The autoencoder + label-conditioned diffusion model, ready to paint images for label maps."""

    def __init__(self, config: SynthesizerConfig, spec: DataSpec, device: torch.device):
        self.config, self.spec, self.device = config, spec, device
        self.autoencoder = build_autoencoder(config.autoencoder, spec.spatial_dims, spec.in_channels).to(device).eval()
        self.model = build_image_generator(config.diffusion, spec.spatial_dims, config.autoencoder.latent_channels,
                                           spec.num_classes, spec.in_channels).to(device).eval()
        self.train_scheduler = build_train_scheduler(config.diffusion)
        self.scale_factor = 1.0
        self.weights = "raw"  # which diffusion weights sample: "raw" or "ema" (set by load)

    @classmethod
    def load(cls, folder: Path, device: torch.device, weights: str = "ema") -> "Synthesizer":
        """Loads a finished synthesizer (both stages); refuses an unfinished one.

        ``weights``: "ema" samples with the EMA of the diffusion weights when the file has one (else the raw
        weights, as files from before EMA), "raw" with the last training weights.
        """
        if weights not in ("ema", "raw"):
            raise DiffAugError(f"weights must be 'ema' or 'raw', not {weights!r}.")
        folder = Path(folder)
        config, spec, _ = read_run_files(folder)
        if not spec.training_cases:
            raise DiffAugError(f"{folder} learned from unlabelled images only (--unlabeled-only): it has never seen a "
                               f"label map, so it cannot paint for one. Start a fold's synthesizer from it: "
                               f"diffaug_train_synthesizer ... --init-from {folder}.")
        if config.context.enabled != (spec.context is not None):
            raise DiffAugError(f"{folder / SPEC_FILE}: its config.json {'asks for' if config.context.enabled else 'has no'}"
                               f" context classes, but its spec {'lacks' if config.context.enabled else 'holds'} the "
                               f"fitted context; the model's condition has "
                               f"{'one channel per context class' if config.context.enabled else 'none'}, so it cannot "
                               f"paint label maps {'without' if config.context.enabled else 'with'} them. Restore the "
                               f"file or retrain (diffaug_train_synthesizer --overwrite).")
        syn = cls(config, spec, device)
        for stage in STAGES:
            if not final_file(folder, stage).is_file():
                raise DiffAugError(f"{final_file(folder, stage)} does not exist: the synthesizer's {stage} stage has "
                                   f"not finished. Rerun diffaug_train_synthesizer with the same arguments to finish it.")
        ae_tensors, _ = load_checkpoint(final_file(folder, "autoencoder"), device)
        syn.autoencoder.load_state_dict(unprefixed("autoencoder", ae_tensors))
        dm_tensors, dm_state = load_checkpoint(final_file(folder, "diffusion"), device)
        ema = ema_weights(dm_tensors) if weights == "ema" else None
        syn.model.load_state_dict(ema if ema is not None else unprefixed("model", dm_tensors))
        syn.weights = "ema" if ema is not None else "raw"
        syn.scale_factor = float(dm_state["scale_factor"])
        return syn

    @property
    def latent_window(self) -> list[int]:
        """Decoding window in latent voxels: the training patch, so decoder memory never exceeds training's."""
        f = self.config.latent_factor()
        return [max(1, p // f) for p in self.spec.patch_size]

    def condition(self, labels: torch.Tensor, images: torch.Tensor | None = None,
                  spacing: torch.Tensor | None = None, class_stats: torch.Tensor | None = None,
                  use_image: torch.Tensor | None = None, unlabeled: torch.Tensor | None = None) -> Condition:
        """The model's condition for class-index maps (B, 1, *spatial); ``images`` feed the edge hint, if any;
        ``class_stats`` (B, K, C, 2) the class-intensity maps, if configured (None: no statistics);
        ``unlabeled`` (B,) booleans: samples that get the "no label" condition (models with diffusion.null_label)."""
        dcfg = self.config.diffusion
        spatial = spatial_condition(labels, self.spec.num_classes, dcfg.edge_hint,
                                    images if dcfg.edge_hint else None, use_image,
                                    self.spec.in_channels if dcfg.class_intensity else 0, class_stats)
        if dcfg.null_label:
            spatial = with_null_label(spatial, unlabeled)
        return Condition(spatial, spacing if dcfg.tag_conditioning else None)

    def sampling_model(self, guidance: float | None = None) -> torch.nn.Module:
        """The model the samplers call: with classifier-free guidance on the label map when ``guidance`` (default:
        sampling.label_guidance) is not 1; that needs a model trained with the "no label" condition."""
        guidance = self.config.sampling.label_guidance if guidance is None else float(guidance)
        if guidance == 1.0:
            return self.model
        if not self.config.diffusion.null_label:
            raise DiffAugError(f"label guidance {guidance}: this synthesizer was trained without the 'no label' "
                               f"condition (diffusion.null_label; train it with --unlabeled or "
                               f"diffusion.label_dropout > 0), so only guidance 1 (plain conditional) works.")
        if guidance < 0:
            raise DiffAugError(f"label guidance {guidance} must be >= 0.")
        return GuidedModel(self.model, guidance)

    @torch.no_grad()
    def generate(self, labels: np.ndarray, sampler: Sampler, generator: torch.Generator, progress: bool = False,
                 edge_images: np.ndarray | None = None, spacing=None, class_stats=None,
                 guidance: float | None = None) -> np.ndarray:
        """Class-index label maps (B, *spatial) of any size -> clamped normalised images (B, C, *spatial).

        ``edge_images`` (B, C, *spatial), normalised: real images whose edges join the edge hint (used only
        by synthesizers trained with ``edge_hint``). ``spacing``: the acquisition-spacing tag (mm, nnU-Net
        axis order), one (3,) for all maps or (B, 3); used only with ``tag_conditioning``; None = no tag.
        ``class_stats``: per-class mean and sd of the normalised image (:mod:`class_stats`), one (K, C, 2) for
        all maps or (B, K, C, 2); used only with ``class_intensity``; None = paint without them.
        ``guidance``: classifier-free guidance weight on the label map (default: sampling.label_guidance).
        """
        if self.device.type == "cpu":
            enable_fast_cpu_convolutions(self.model)
            enable_fast_cpu_convolutions(self.autoencoder)
        spatial = labels.shape[1:]
        target = padded_shape(spatial, self.config.divisor())
        padded, pads = pad_to(labels[:, None], target)
        lab_t = torch.from_numpy(np.ascontiguousarray(padded).astype(np.int64)).to(self.device)
        img_t = None
        if edge_images is not None:
            img_t = torch.from_numpy(np.ascontiguousarray(pad_to(edge_images.astype(np.float32), target)[0]))
            img_t = img_t.to(self.device)
        spacing_t = None
        if spacing is not None:
            spacing_t = torch.from_numpy(np.broadcast_to(np.asarray(spacing, dtype=np.float32), (len(labels), 3)).copy())
            spacing_t = spacing_t.to(self.device)
        stats_t = None
        if class_stats is not None:
            stats = np.asarray(class_stats, dtype=np.float32)
            stats_t = torch.from_numpy(np.broadcast_to(stats, (len(labels), *stats.shape[-3:])).copy()).to(self.device)
        condition = self.condition(lab_t, img_t, spacing_t, stats_t)
        with autocast(self.device, self.config.mixed_precision):
            images = generate_images(self.autoencoder, self.sampling_model(guidance), self.scale_factor, condition,
                                     self.config.autoencoder.latent_channels, self.config.latent_factor(),
                                     self.latent_window, sampler, generator, self.config.sampling.decode_overlap,
                                     progress, self.latent_window if self.config.sampling.diffusion_windows else None,
                                     self.config.sampling.diffusion_overlap)
        crop = tuple(slice(b, b + s) for (b, _), s in zip(pads, spatial))
        images = images[(slice(None), slice(None), *crop)].float().cpu().numpy()
        lo = np.asarray(self.spec.intensity_min, dtype=np.float32).reshape(1, -1, *[1] * len(spatial))
        hi = np.asarray(self.spec.intensity_max, dtype=np.float32).reshape(1, -1, *[1] * len(spatial))
        # untrained or unlucky samples can blow up: keep values inside the training data's range
        return np.clip(np.nan_to_num(images, nan=0.0), lo, hi)

    def sampler(self, name: str | None = None, steps: int | None = None) -> Sampler:
        return Sampler(name or self.config.sampling.sampler, self.train_scheduler,
                       self.config.sampling.steps if steps is None else steps)
