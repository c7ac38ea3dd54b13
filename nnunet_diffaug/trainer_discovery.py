"""Makes nnU-Net find our trainer classes: nnUNet_extTrainer must name the folder of our shim module.

Library code (benchmark, evaluation) and the console scripts share this; it lives below the CLI so
that no library module imports cli.py.
"""
from __future__ import annotations

import os

from nnunet_diffaug.paths import trainer_shim_folder


def ensure_trainer_discoverable() -> str:
    """Points nnUNet_extTrainer at our shim folder for this process and every process it starts."""
    shim = str(trainer_shim_folder())
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if shim not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [shim])
    return os.environ["nnUNet_extTrainer"]
