"""Label-conditioned latent diffusion: one module, SPADE or ControlNet conditioning behind one call.

- SPADE (default): ``SPADEDiffusionModelUNet`` normalises every block with the one-hot label map
  (MONAI resizes it to each level).
- ControlNet: a ``ControlNet`` reads the full-resolution one-hot label map (its embedding downsamples
  it to the latent size with learned strided convolutions, so structures smaller than a latent voxel
  still leave a trace) and adds residuals to a ``DiffusionModelUNet``. Both are trained jointly.

Optional extra conditioning (see :mod:`conditioning`): an edge-hint channel beside the one-hot
labels, per-class intensity maps, and a tag vector (channel names, acquisition spacing) broadcast
as constant channels.
"""
from __future__ import annotations

import torch
from torch import nn

from nnunet_diffaug.synthesis.conditioning import Condition, TagEncoder, condition_channels, null_spatial
from nnunet_diffaug.synthesis.config import DiffusionConfig


class LabelConditionedUNet(nn.Module):
    """Predicts noise (or velocity) for latents ``z`` at ``timesteps`` given a :class:`Condition`."""

    def __init__(self, cfg: DiffusionConfig, spatial_dims: int, latent_channels: int, num_classes: int,
                 image_channels: int = 1):
        super().__init__()
        from monai.networks.nets import ControlNet, DiffusionModelUNet, SPADEDiffusionModelUNet
        self.conditioning = cfg.conditioning
        cond_channels = condition_channels(num_classes, cfg.edge_hint, cfg.tag_dim if cfg.tag_conditioning else 0,
                                           image_channels if cfg.class_intensity else 0, cfg.null_label)
        common = dict(spatial_dims=spatial_dims, in_channels=latent_channels, channels=tuple(cfg.channels),
                      attention_levels=tuple(cfg.attention_levels), num_res_blocks=cfg.num_res_blocks,
                      norm_num_groups=cfg.norm_num_groups, num_head_channels=cfg.num_head_channels,
                      use_flash_attention=True)  # fused attention: same weights, bounded memory on large latents
        self.tags = TagEncoder(image_channels, cfg.tag_dim) if cfg.tag_conditioning else None
        if cfg.conditioning == "spade":
            self.unet = SPADEDiffusionModelUNet(out_channels=latent_channels, label_nc=cond_channels,
                                                spade_intermediate_channels=cfg.spade_hidden_channels, **common)
            self.controlnet = None
        else:
            self.unet = DiffusionModelUNet(out_channels=latent_channels, **common)
            self.controlnet = ControlNet(conditioning_embedding_in_channels=cond_channels,
                                         conditioning_embedding_num_channels=tuple(cfg.controlnet_embedding_channels),
                                         **common)

    def forward(self, z: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> torch.Tensor:
        spatial = condition.spatial
        if self.tags is not None:
            spatial = torch.cat([spatial, self.tags.as_channels(condition.spacing, spatial)], dim=1)
        if self.controlnet is None:
            return self.unet(z, timesteps, seg=spatial)
        down, mid = self.controlnet(z, timesteps, controlnet_cond=spatial)
        return self.unet(z, timesteps, down_block_additional_residuals=down, mid_block_additional_residual=mid)


def classifier_free_guidance(conditional: torch.Tensor, null: torch.Tensor, weight: float) -> torch.Tensor:
    """Ho & Salimans (arXiv 2207.12598, 2022): ``null + w * (conditional - null)``; w = 1 is the conditional model."""
    return null + weight * (conditional - null)


class GuidedModel(nn.Module):
    """Classifier-free guidance on the label map (Ho & Salimans, "Classifier-Free Diffusion Guidance", arXiv
    2207.12598, 2022): ``null + w * (conditional - null)``, the null branch on the learned "no label" condition
    (:func:`conditioning.null_spatial`; tags are kept). Called like the model, so every sampler and the
    windowed denoising use it unchanged; one batched call evaluates both branches."""

    def __init__(self, model: LabelConditionedUNet, guidance: float):
        super().__init__()
        self.model, self.guidance = model, float(guidance)

    def forward(self, z: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> torch.Tensor:
        spacing = condition.spacing
        both = Condition(torch.cat([condition.spatial, null_spatial(condition.spatial)]),
                         None if spacing is None else torch.cat([spacing.reshape(-1, spacing.shape[-1])] * 2))
        out = self.model(torch.cat([z, z]), torch.cat([timesteps, timesteps]), both)
        return classifier_free_guidance(*out.chunk(2), self.guidance)


def build_image_generator(cfg: DiffusionConfig, spatial_dims: int, latent_channels: int, num_classes: int,
                          image_channels: int = 1) -> LabelConditionedUNet:
    return LabelConditionedUNet(cfg, spatial_dims, latent_channels, num_classes, image_channels)


def build_train_scheduler(cfg: DiffusionConfig):
    """The training noise process: MONAI's DDPM scheduler (``clip_sample=False`` because latents are not bounded
    to [-1, 1]), or its rectified-flow scheduler (Liu et al., "Flow Straight and Fast", ICLR 2023) with continuous
    timesteps, logit-normal by default (Esser et al., "Scaling Rectified Flow Transformers", ICML 2024)."""
    if cfg.objective == "rflow":
        from monai.networks.schedulers import RFlowScheduler
        return RFlowScheduler(num_train_timesteps=cfg.num_train_timesteps, use_discrete_timesteps=False,
                              sample_method=cfg.rflow_timesteps, use_timestep_transform=False)
    from monai.networks.schedulers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.beta_schedule,
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end, clip_sample=False,
                         prediction_type=cfg.prediction_type)


def is_rflow(scheduler) -> bool:
    from monai.networks.schedulers import RFlowScheduler
    return isinstance(scheduler, RFlowScheduler)


def training_timesteps(scheduler, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random training timesteps, one per sample, drawn from ``generator`` (reproducible per step)."""
    n = latents.shape[0]
    if not is_rflow(scheduler):
        return torch.randint(0, scheduler.num_train_timesteps, (n,), generator=generator).to(latents.device)
    u = torch.rand((n,), generator=generator, dtype=torch.float64)
    if scheduler.sample_method == "logit-normal":  # sigmoid of a standard normal, as MONAI's LogisticNormal(0, 1)
        u = torch.sigmoid(torch.randn((n,), generator=generator, dtype=torch.float64))
    return (u * scheduler.num_train_timesteps).float().to(latents.device)


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    if is_rflow(scheduler):  # the flow's velocity, from noise (t = T) towards the data (t = 0), per unit t/T
        return latents - noise
    if scheduler.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def predicted_original(scheduler, noisy: torch.Tensor, model_output: torch.Tensor,
                       timesteps: torch.Tensor) -> torch.Tensor:
    """The one-step estimate of the clean latents from ``noisy`` latents at ``timesteps`` and the model's output,
    under the conventions of :func:`diffusion_target` and the schedulers' ``add_noise``: differentiable in
    ``model_output``.

    - rectified flow: ``x_t = (1 - s) x_0 + s noise`` with ``s = t / T`` and target ``x_0 - noise``, so
      ``x_0 = x_t + s v``;
    - v-prediction: ``x_t = a x_0 + b noise`` (``a = sqrt(alpha_bar_t)``, ``b = sqrt(1 - alpha_bar_t)``) and
      ``v = a noise - b x_0``, so ``x_0 = a x_t - b v``;
    - epsilon: ``x_0 = (x_t - b noise) / a``.
    """
    shape = (-1,) + (1,) * (noisy.ndim - 1)
    if is_rflow(scheduler):
        s = (timesteps.float() / scheduler.num_train_timesteps).view(shape).to(noisy.dtype)
        return noisy + s * model_output
    alpha_bar = scheduler.alphas_cumprod.to(device=noisy.device, dtype=torch.float32)[timesteps.long()].view(shape)
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if scheduler.prediction_type == "v_prediction":
        return a * noisy - b * model_output
    return (noisy - b * model_output) / a
