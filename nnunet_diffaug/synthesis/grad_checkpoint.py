"""Gradient checkpointing for MONAI's diffusion UNets, which do not offer it themselves.

Each down/middle/up block (and ControlNet's) keeps only its inputs in the forward pass and recomputes
its activations during backward: memory for large 3D patches drops to about one block's worth, at
the cost of a second forward. The blocks have no randomness, so gradients are unchanged.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(block: nn.Module):
    forward = block.forward

    def run(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return run


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Checkpoints every UNet block inside ``model``; returns how many were wrapped."""
    count = 0
    for m in model.modules():
        for name in ("down_blocks", "up_blocks"):
            for block in getattr(m, name, None) or []:
                if not getattr(block, "_diffaug_checkpointed", False):
                    block.forward, block._diffaug_checkpointed = _checkpointed(block), True
                    count += 1
        block = getattr(m, "middle_block", None)
        if isinstance(block, nn.Module) and not getattr(block, "_diffaug_checkpointed", False):
            block.forward, block._diffaug_checkpointed = _checkpointed(block), True
            count += 1
    return count
