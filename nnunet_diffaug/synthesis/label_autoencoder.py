"""The label autoencoder: one-hot label maps <-> a few latent channels (MONAI AutoencoderKL), as in Ruschke et al.,
"Guided Synthesis of Labeled Brain MRI Data Using Latent Diffusion Models for Segmentation of Enlarged
Ventricles" (arXiv 2411.01351, 2024).

Its decoder outputs class logits; the loss is cross-entropy + soft Dice (+ a small KL term), so
small classes are reconstructed, not averaged away. Decoding takes the argmax, so generated maps
only ever hold declared class indices.
"""
from __future__ import annotations

import torch
from torch import nn

from nnunet_diffaug.synthesis.autoencoder import kl_loss
from nnunet_diffaug.synthesis.config import LabelGeneratorConfig


def build_label_autoencoder(cfg: LabelGeneratorConfig, spatial_dims: int, num_classes: int) -> nn.Module:
    from monai.networks.nets import AutoencoderKL
    levels = len(cfg.autoencoder_channels)
    return AutoencoderKL(spatial_dims=spatial_dims, in_channels=num_classes, out_channels=num_classes,
                         channels=tuple(cfg.autoencoder_channels), latent_channels=cfg.latent_channels,
                         num_res_blocks=1, attention_levels=(False,) * levels, norm_num_groups=cfg.norm_num_groups,
                         with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)


def soft_dice_loss(logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """1 - mean Dice over the classes present in the batch (absent classes would only add noise)."""
    probs = torch.softmax(logits, dim=1)
    dims = [0] + list(range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    present = onehot.sum(dims) > 0
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return 1 - dice[present].mean()


def label_autoencoder_loss(cfg: LabelGeneratorConfig, logits, onehot, z_mu, z_sigma) -> tuple[torch.Tensor, dict]:
    ce = nn.functional.cross_entropy(logits, onehot.argmax(1))
    dice = soft_dice_loss(logits, onehot)
    kl = kl_loss(z_mu, z_sigma)
    loss = ce + cfg.dice_weight * dice + cfg.kl_weight * kl
    return loss, {"ce": float(ce.detach()), "dice": float(dice.detach()), "kl": float(kl.detach())}


@torch.no_grad()
def decode_to_classes(autoencoder: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Latents -> (B, *spatial) class indices (argmax over the decoded logits)."""
    return autoencoder.decode_stage_2_outputs(z).float().argmax(1)
