"""Training length and seed from the environment, so two arms of a comparison get the same budget.

``DIFFAUG_NUM_EPOCHS``, ``DIFFAUG_ITERATIONS_PER_EPOCH`` and ``DIFFAUG_VAL_ITERATIONS`` override
nnU-Net's 1000 x 250 (+50 validation) iterations when set; ``DIFFAUG_SEED`` seeds Python, NumPy and
torch in the main process (network initialisation, batch composition without workers). Unset,
nothing changes.

``DIFFAUG_ITERATION_SCALE`` (>= 1) multiplies the iterations per epoch after that: the equal-compute
control of an arm that trains longer (a stock run given the iterations that ``_equalreal`` DiffAug arms
spend, so a gain cannot come from the extra training alone).
"""
from __future__ import annotations

import os

from nnunet_diffaug import env_vars
from nnunet_diffaug.env_vars import env_float
from nnunet_diffaug.errors import DiffAugError

BUDGET_ENV = {
    env_vars.NUM_EPOCHS: "num_epochs",
    env_vars.ITERATIONS_PER_EPOCH: "num_iterations_per_epoch",
    env_vars.VAL_ITERATIONS: "num_val_iterations_per_epoch",
}


def scaled_iterations(iterations_per_epoch: int, scale: float) -> int:
    """Iterations per epoch under ``DIFFAUG_ITERATION_SCALE`` (the benchmark reports the same number)."""
    return round(iterations_per_epoch * scale)


def apply_budget_from_env(trainer) -> None:
    for env_name, attribute in BUDGET_ENV.items():
        if os.environ.get(env_name):
            value = env_float(env_name, 0, 1, 10 ** 9)
            if value != int(value):
                raise DiffAugError(f"Environment variable {env_name}={os.environ[env_name]!r} must be an integer.")
            setattr(trainer, attribute, int(value))
    scale = env_float(env_vars.ITERATION_SCALE, 1.0, 1.0, 100.0)
    trainer.num_iterations_per_epoch = scaled_iterations(trainer.num_iterations_per_epoch, scale)
    if os.environ.get(env_vars.SEED):
        seed = int(env_float(env_vars.SEED, 0, 0, 2 ** 31 - 1))
        import random
        import numpy as np
        import torch
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
