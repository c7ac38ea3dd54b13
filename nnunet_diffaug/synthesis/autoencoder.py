"""The image autoencoder: MONAI's AutoencoderKL, its loss, and the optional patch discriminator; and the
latent scale factor every latent diffusion stage (image and label side) estimates from its autoencoder."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from nnunet_diffaug.synthesis.config import AutoencoderConfig
from nnunet_diffaug.synthesis.loss_weights import weighted_mean


def build_autoencoder(cfg: AutoencoderConfig, spatial_dims: int, in_channels: int) -> nn.Module:
    from monai.networks.nets import AutoencoderKL
    return AutoencoderKL(
        spatial_dims=spatial_dims, in_channels=in_channels, out_channels=in_channels,
        channels=tuple(cfg.channels), latent_channels=cfg.latent_channels, num_res_blocks=cfg.num_res_blocks,
        attention_levels=tuple(cfg.attention_levels), norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=cfg.nonlocal_attention, with_decoder_nonlocal_attn=cfg.nonlocal_attention,
        use_flash_attention=True,  # torch's fused attention: same weights, far less memory on large volumes
    )


def build_discriminator(cfg: AutoencoderConfig, spatial_dims: int, in_channels: int) -> nn.Module | None:
    if cfg.adversarial_weight <= 0:
        return None
    from monai.networks.nets import PatchDiscriminator
    return PatchDiscriminator(spatial_dims=spatial_dims, in_channels=in_channels,
                              channels=cfg.discriminator_channels, num_layers_d=cfg.discriminator_layers)


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)), summed over latent voxels, averaged over the batch."""
    dims = list(range(1, z_mu.ndim))
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1, dim=dims)
    return kl.mean()


class AutoencoderLoss:
    """L1 + KL, plus a least-squares patch-adversarial term once ``adversarial_start_step`` is reached."""

    def __init__(self, cfg: AutoencoderConfig, discriminator: nn.Module | None):
        self.cfg = cfg
        self.discriminator = discriminator
        if discriminator is not None:
            from monai.losses import PatchAdversarialLoss
            self.adversarial = PatchAdversarialLoss(criterion="least_squares")

    def adversarial_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.adversarial_start_step

    def generator_loss(self, images, recon, z_mu, z_sigma, step: int,
                       voxel_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """``voxel_weights`` (B, 1, *spatial): class-balanced L1 (loss_weights.py); plain L1 is logged either way."""
        l1 = torch.nn.functional.l1_loss(recon, images)
        kl = kl_loss(z_mu, z_sigma)
        parts = {"l1": float(l1.detach()), "kl": float(kl.detach())}
        if voxel_weights is not None:
            l1 = weighted_mean((recon - images).abs(), voxel_weights)
            parts["weighted_l1"] = float(l1.detach())
        loss = l1 + self.cfg.kl_weight * kl
        if self.adversarial_active(step):
            logits = self.discriminator(recon.contiguous())[-1]
            adv = self.adversarial(logits, target_is_real=True, for_discriminator=False)
            loss = loss + self.cfg.adversarial_weight * adv
            parts["adv_g"] = float(adv.detach())
        return loss, parts

    def discriminator_loss(self, images, recon, discriminator: nn.Module | None = None) -> tuple[torch.Tensor, dict]:
        """``discriminator``: what to call instead of the discriminator itself (its DDP wrapper, which averages
        its gradients over processes)."""
        discriminator = self.discriminator if discriminator is None else discriminator
        fake = discriminator(recon.detach().contiguous())[-1]
        real = discriminator(images.contiguous())[-1]
        loss = 0.5 * (self.adversarial(fake, target_is_real=False, for_discriminator=True)
                      + self.adversarial(real, target_is_real=True, for_discriminator=True))
        return loss, {"adv_d": float(loss.detach())}


@torch.no_grad()
def encode_mean(autoencoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Latent means: the diffusion model learns the deterministic part of the posterior."""
    z_mu, _ = autoencoder.encode(images)
    return z_mu


@torch.no_grad()
def estimate_scale_factor(autoencoder: nn.Module, sampler, n_batches: int, batch_size: int,
                          device: torch.device, seed: int, stream: int) -> float:
    """1 / std of the latent means over many batches (one batch is too noisy an estimate).

    ``sampler.batch(rng, batch_size)[0]`` is the autoencoder's input; batch ``k`` draws from the random
    stream ``(seed, stream, k)``, so each stage that estimates a scale keeps its own stream. Running sums
    keep memory flat however many batches are asked for.
    """
    total, total_sq, count = 0.0, 0.0, 0
    for k in range(n_batches):
        inputs = sampler.batch(np.random.default_rng([seed, stream, k]), batch_size)[0]
        z = encode_mean(autoencoder, inputs.to(device)).double()
        total += float(z.sum())
        total_sq += float((z * z).sum())
        count += z.numel()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 1e-12))
    return 1.0 / std
