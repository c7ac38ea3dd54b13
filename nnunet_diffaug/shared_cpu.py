"""Environment defaults for nnU-Net training and synthesis on a few CPU cores shared by several processes.

nnU-Net trains with data-augmentation worker processes beside the main process, and a benchmark often runs
beside other jobs. OpenMP threads that busy-wait for work then take the cores those processes need: on this
project's 2-core machines, shared by two benchmarks and a test run, a `2d` benchmark epoch took 17.0 s with
OpenMP's default waiting and 5.4 s once both benchmarks ran with ``OMP_WAIT_POLICY=PASSIVE`` (mean of 60+
epochs each). The user's own settings always win.
"""
from __future__ import annotations

import os
from typing import MutableMapping


def set_shared_cpu_defaults(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Fill in (never override) the variables that keep CPU runs from starving each other; returns ``env``."""
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # nnU-Net's export pools default to 8 processes; on a small machine their start-up dominates
    env.setdefault("nnUNet_def_n_proc", str(min(4, os.cpu_count() or 1)))
    return env
