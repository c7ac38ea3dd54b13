"""An exponential moving average (EMA) of a model's weights, updated after every optimizer step.

Sampling from the EMA rather than the last weights gives smoother, more stable diffusion samples
(Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020; kept by MAISI, Guo et al.,
WACV 2025). torch's ``AveragedModel`` does the averaging: its first update copies the weights, each
later one sets ``ema = decay * ema + (1 - decay) * weights``.

Checkpoints store it as the module ``ema_model``: ``ema_model.n_averaged`` and ``ema_model.module.<key>``
beside the raw ``model.<key>``, so files written before EMA existed load unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

EMA_MODULE = "ema_model"
EMA_PREFIX = EMA_MODULE + ".module"


def build_ema(model: nn.Module, decay: float) -> nn.Module | None:
    """The EMA wrapper of ``model`` (None when ``decay`` is 0). Buffers are copied, not averaged: the
    model's only buffers are fixed references set before training."""
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module | None, model: nn.Module) -> None:
    if ema is None:
        return
    ema.update_parameters(model)
    for b_ema, b in zip(ema.module.buffers(), model.buffers()):
        b_ema.copy_(b)


def ema_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The EMA's state dict inside a checkpoint's tensors, or None if it has none (older or EMA off)."""
    p = EMA_PREFIX + "."
    found = {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
    return found or None
