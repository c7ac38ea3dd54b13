"""A label generator: latent diffusion over label maps, conditioned on class volume fractions.

The one-hot map is embedded by the label autoencoder (:mod:`label_autoencoder`); a MONAI
``DiffusionModelUNet`` denoises those latents. The attributes (foreground volume fractions,
standardised with the training statistics) enter through a small MLP whose output is added to the
timestep embedding: MONAI's ``class_embedding`` slot, fed a float vector instead of an integer
class. That needs no attention layers, which are costly in 3D.

Classifier-free guidance: the MLP's input is ``[attributes * keep, keep]``; training sets
``keep = 0`` (the null condition) with probability ``condition_dropout``; sampling mixes
``out_null + w * (out_cond - out_null)``. Unconditional sampling is the null condition alone.

Generated maps have a fixed *canvas* shape: the median training map shape (2D: slice shape),
capped by the config, padded to the networks' divisor with the 'outside' class and cropped back.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.synthesis.checkpoint import final_file, load_checkpoint, unprefixed
from nnunet_diffaug.synthesis.config import DiffusionConfig, LabelGeneratorConfig
from nnunet_diffaug.synthesis.ema import ema_weights
from nnunet_diffaug.synthesis.image_generator import build_train_scheduler, classifier_free_guidance
from nnunet_diffaug.synthesis.label_autoencoder import build_label_autoencoder, decode_to_classes
from nnunet_diffaug.synthesis.sampling import Sampler, enable_fast_cpu_convolutions, padded_shape

LABEL_STAGES = ("label_autoencoder", "label_diffusion")


def canvas_shape(map_shapes: list[tuple[int, ...]], max_shape: tuple[int, ...]) -> list[int]:
    """The median training map shape, capped per axis."""
    median = np.median(np.array(map_shapes), axis=0)
    return [int(min(round(float(m)), c)) for m, c in zip(median, max_shape)]


def centre_pads(shape: list[int], target: list[int]) -> list[tuple[int, int]]:
    return [((t - s) // 2, t - s - (t - s) // 2) for s, t in zip(shape, target)]


def crop_centre(array: np.ndarray, shape: list[int]) -> np.ndarray:
    """Crops the trailing axes of ``array`` back to ``shape`` (undoes :func:`centre_pads` padding)."""
    spatial = array.shape[-len(shape):]
    sl = tuple(slice((a - s) // 2, (a - s) // 2 + s) for a, s in zip(spatial, shape))
    return array[(Ellipsis, *sl)]


class AttributeEmbedding(nn.Module):
    """[standardised attributes * keep, keep] -> a vector added to the timestep embedding."""

    def __init__(self, num_attributes: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * num_attributes, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.net(condition.float())


class LabelDiffusionUNet(nn.Module):
    def __init__(self, cfg: LabelGeneratorConfig, spatial_dims: int, num_attributes: int):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet
        self.num_attributes = num_attributes
        self.unet = DiffusionModelUNet(
            spatial_dims=spatial_dims, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
            channels=tuple(cfg.channels), attention_levels=(False,) * len(cfg.channels),
            num_res_blocks=cfg.num_res_blocks, norm_num_groups=cfg.norm_num_groups, num_class_embeds=1)
        # MONAI adds class_embedding(class_labels) to the timestep embedding; ours reads float attributes
        self.unet.class_embedding = AttributeEmbedding(num_attributes, cfg.channels[0] * 4)

    def forward(self, z: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.unet(z, timesteps, class_labels=condition)


def condition_vector(standardised: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, A) standardised attributes, (B,) 0/1 keep flags -> (B, 2A) model condition."""
    k = keep.float()[:, None]
    return torch.cat([standardised * k, k.expand(-1, standardised.shape[1])], dim=1)


def build_label_scheduler():
    """The image diffusion's default schedule (scaled linear betas, v-prediction): one less thing to tune."""
    return build_train_scheduler(DiffusionConfig())


class LabelGenerator:
    """Label autoencoder + attribute-conditioned latent diffusion; samples class-index maps."""

    def __init__(self, cfg: LabelGeneratorConfig, spatial_dims: int, num_classes: int, num_attributes: int,
                 device: torch.device):
        """``num_classes``: every class index of the maps (labels, 'outside', context); ``num_attributes``: the
        declared foreground classes 1..A, whose volume fractions condition the model."""
        self.cfg, self.spatial_dims, self.num_classes, self.device = cfg, spatial_dims, num_classes, device
        self.num_attributes = num_attributes
        self.autoencoder = build_label_autoencoder(cfg, spatial_dims, num_classes).to(device).eval()
        self.model = LabelDiffusionUNet(cfg, spatial_dims, self.num_attributes).to(device).eval()
        self.train_scheduler = build_label_scheduler()
        # filled by training (and stored in the label_diffusion file's JSON state)
        self.state: dict = {"scale_factor": 1.0, "canvas": None, "attribute_mean": [0.0] * self.num_attributes,
                            "attribute_std": [1.0] * self.num_attributes, "training_attributes": []}

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, folder: Path, cfg: LabelGeneratorConfig, spatial_dims: int, num_classes: int, num_attributes: int,
             device: torch.device, synthesize_hint: str = "") -> "LabelGenerator":
        folder = Path(folder)
        if not cfg.enabled:
            raise DiffAugError(f"{folder / 'config.json'}: this synthesizer was trained without a label generator "
                               f"(label_generator.enabled is false), so --labels generated is unavailable. Train "
                               f"one: write a config JSON with {{\"base\": ..., \"label_generator\": {{\"enabled\": "
                               f"true}}}} and run diffaug_train_synthesizer --preset that.json --overwrite {synthesize_hint}"
                               f"(or use the 'default' preset, which has it). --labels real and real-aligned work.")
        for stage in LABEL_STAGES:
            if not final_file(folder, stage).is_file():
                raise DiffAugError(f"{final_file(folder, stage)} does not exist: the label generator's {stage} "
                                   f"stage has not finished. Rerun diffaug_train_synthesizer with the same "
                                   f"arguments to finish it.")
        gen = cls(cfg, spatial_dims, num_classes, num_attributes, device)
        ae, _ = load_checkpoint(final_file(folder, "label_autoencoder"), device)
        gen.autoencoder.load_state_dict(unprefixed("label_autoencoder", ae))
        dm, state = load_checkpoint(final_file(folder, "label_diffusion"), device)
        ema = ema_weights(dm)  # the EMA samples when the file has one (label_generator.ema_decay > 0)
        gen.model.load_state_dict(ema if ema is not None else unprefixed("label_model", dm))
        gen.state.update({k: state[k] for k in gen.state})
        return gen

    # ------------------------------------------------------------------ attributes
    @property
    def canvas(self) -> list[int]:
        return list(self.state["canvas"])

    @property
    def training_attributes(self) -> np.ndarray:
        return np.asarray(self.state["training_attributes"], dtype=np.float64).reshape(-1, self.num_attributes)

    def standardise(self, attributes: np.ndarray) -> torch.Tensor:
        mean = np.asarray(self.state["attribute_mean"])
        std = np.asarray(self.state["attribute_std"])
        return torch.as_tensor((np.asarray(attributes) - mean) / std, dtype=torch.float32)

    # ------------------------------------------------------------------ sampling
    def sampler(self, name: str = "dpmpp", steps: int | None = None) -> Sampler:
        return Sampler(name, self.train_scheduler, self.cfg.sampling_steps if steps is None else steps)

    @torch.no_grad()
    def sample(self, attributes: np.ndarray | None, n: int, guidance: float, sampler: Sampler,
               generator: torch.Generator) -> np.ndarray:
        """``n`` maps (n, *canvas) of class indices. ``attributes`` (n, A) fractions, or None: unconditional."""
        if self.device.type == "cpu":
            enable_fast_cpu_convolutions(self.model)
            enable_fast_cpu_convolutions(self.autoencoder)
        null = condition_vector(torch.zeros(n, self.num_attributes), torch.zeros(n))
        if attributes is None:
            cond, guided = null, False
        else:
            cond = condition_vector(self.standardise(attributes), torch.ones(n))
            guided = guidance != 1.0
        cond, null = cond.to(self.device), null.to(self.device)
        padded = padded_shape(self.canvas, self.cfg.divisor())
        f = self.cfg.latent_factor()
        shape = (n, self.cfg.latent_channels, *[s // f for s in padded])
        sampler.begin()
        z = torch.randn(shape, generator=generator).to(self.device)  # CPU noise: same start on every device
        for t in sampler.timesteps:
            tt = torch.full((n,), t, device=self.device, dtype=torch.long)
            if guided:  # one batched call for the conditional and the null branch
                both = self.model(torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([cond, null])).float()
                out = classifier_free_guidance(both[:n], both[n:], guidance)
            else:
                out = self.model(z, tt, cond).float()
            z = sampler.step(out, t, z, generator if sampler.name == "ddpm" else None)
        classes = decode_to_classes(self.autoencoder, z / self.state["scale_factor"]).cpu().numpy()
        return crop_centre(classes, self.canvas).astype(np.uint8)
