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

from nnunet_diffaug.errors import DiffAugError

BUDGET_ENV = {
    "DIFFAUG_NUM_EPOCHS": "num_epochs",
    "DIFFAUG_ITERATIONS_PER_EPOCH": "num_iterations_per_epoch",
    "DIFFAUG_VAL_ITERATIONS": "num_val_iterations_per_epoch",
}
ITERATION_SCALE_ENV = "DIFFAUG_ITERATION_SCALE"


def scaled_iterations(iterations_per_epoch: int, scale: float) -> int:
    """Iterations per epoch under ``DIFFAUG_ITERATION_SCALE`` (the benchmark reports the same number)."""
    return round(iterations_per_epoch * scale)


def env_float(name: str, default: float, low: float, high: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise DiffAugError(f"Environment variable {name}={raw!r} is not a number.") from None
    if not low <= value <= high:
        raise DiffAugError(f"Environment variable {name}={raw!r} must lie in [{low}, {high}].")
    return value


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise DiffAugError(f"Environment variable {name}={raw!r} must be 1 or 0 (also true/false, yes/no, on/off).")


def apply_budget_from_env(trainer) -> None:
    for env_name, attribute in BUDGET_ENV.items():
        if os.environ.get(env_name):
            value = env_float(env_name, 0, 1, 10 ** 9)
            if value != int(value):
                raise DiffAugError(f"Environment variable {env_name}={os.environ[env_name]!r} must be an integer.")
            setattr(trainer, attribute, int(value))
    scale = env_float(ITERATION_SCALE_ENV, 1.0, 1.0, 100.0)
    trainer.num_iterations_per_epoch = scaled_iterations(trainer.num_iterations_per_epoch, scale)
    if os.environ.get("DIFFAUG_SEED"):
        seed = int(env_float("DIFFAUG_SEED", 0, 0, 2 ** 31 - 1))
        import random
        import numpy as np
        import torch
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
