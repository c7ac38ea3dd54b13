"""Every ``DIFFAUG_*`` environment variable, declared once: name, type, allowed values, default, meaning.

The trainers, the synthesis command and the benchmark import the names from here (never a second literal),
and docs/trainer.md's table is generated from :data:`ENV_VARS` by :func:`markdown_table` (a test compares
them), so the documentation cannot list fewer variables than the code reads.

Environment variables, rather than flags, because nnU-Net's own ``nnUNetv2_train`` parses its command line
and passes nothing through to a trainer; nnU-Net itself configures trainers the same way (``nnUNet_n_proc_DA``,
``nnUNet_compile``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from nnunet_diffaug.errors import DiffAugError


@dataclass(frozen=True)
class EnvVar:
    name: str
    kind: str       # int, float, flag (1/0, true/false, yes/no, on/off), text
    allowed: str    # the values accepted; anything else is refused with the variable named
    default: str    # what applies when the variable is unset or empty
    read_by: str    # which command or trainer reads it
    meaning: str


SYNTHETIC_RATIO = "DIFFAUG_SYNTHETIC_RATIO"
SYNTHETIC_SCHEDULE = "DIFFAUG_SYNTHETIC_SCHEDULE"
EQUAL_REAL_EXPOSURE = "DIFFAUG_EQUAL_REAL_EXPOSURE"
SYNTHETIC_DATASET = "DIFFAUG_SYNTHETIC_DATASET"
NUM_EPOCHS = "DIFFAUG_NUM_EPOCHS"
ITERATIONS_PER_EPOCH = "DIFFAUG_ITERATIONS_PER_EPOCH"
VAL_ITERATIONS = "DIFFAUG_VAL_ITERATIONS"
ITERATION_SCALE = "DIFFAUG_ITERATION_SCALE"
SEED = "DIFFAUG_SEED"
MIRRORING = "DIFFAUG_MIRRORING"
PATCHMIX_ALPHA = "DIFFAUG_PATCHMIX_ALPHA"
PATCHMIX_PATCH = "DIFFAUG_PATCHMIX_PATCH"
LOCK_WAIT_S = "DIFFAUG_LOCK_WAIT_S"

_TRAINERS = "our trainers"
_DIFFAUG = "nnUNetTrainerDiffAug and its variants"

ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar(SYNTHETIC_RATIO, "float", "[0, 1]", "the variant's (1/3 for nnUNetTrainerDiffAug)", _DIFFAUG,
           "share r of synthetic samples per training batch; 0 trains exactly like the stock trainer. "
           "Refused by the PatchMix variants, which pair every real sample with a synthetic one instead"),
    EnvVar(SYNTHETIC_SCHEDULE, "text", "`auto`, `constant`, `linear`, `cutoff:F` with F in (0, 1]",
           "the variant's (`auto`)", _DIFFAUG,
           "how r changes over the epochs: `auto` is `cutoff:0.75` with at most 3 real training cases, "
           "`constant` with more"),
    EnvVar(EQUAL_REAL_EXPOSURE, "flag", "1 or 0", "the variant's (0; 1 for `_equalreal`)", _DIFFAUG,
           "1: each epoch runs stock / (1 - r_epoch) iterations, so the run sees as many real samples as stock"),
    EnvVar(SYNTHETIC_DATASET, "text", "a dataset name, id or folder", "the only synthetic set made for the fold",
           _DIFFAUG, "which synthetic set to train with when several were made for the fold"),
    EnvVar(NUM_EPOCHS, "int", ">= 1", "nnU-Net's (1000; 5 for `nnUNetTrainerDiffAug_5epochs`)", _TRAINERS,
           "training epochs"),
    EnvVar(ITERATIONS_PER_EPOCH, "int", ">= 1", "nnU-Net's (250)", _TRAINERS, "training iterations per epoch"),
    EnvVar(VAL_ITERATIONS, "int", ">= 1", "nnU-Net's (50)", _TRAINERS, "validation iterations per epoch"),
    EnvVar(ITERATION_SCALE, "float", "[1, 100]", "1", _TRAINERS,
           "multiplies the iterations per epoch (after the three above): the equal-compute stock control "
           "(`stock_x150` in the benchmark)"),
    EnvVar(SEED, "int", "[0, 2^31 - 1]", "unset: nnU-Net's unseeded start", _TRAINERS,
           "seeds Python, NumPy and torch when the trainer starts"),
    EnvVar(MIRRORING, "flag", "1 or 0", "1 (nnU-Net's mirroring)", _TRAINERS,
           "0: no mirroring in training and none at inference, as nnU-Net's `nnUNetTrainerNoMirroring` "
           "(for labels that name a side)"),
    EnvVar(PATCHMIX_ALPHA, "float", "[0, 1]", "the variant's (0.6)", "nnUNetTrainerDiffAugPatchMix",
           "probability that a merge patch comes from the real sample"),
    EnvVar(PATCHMIX_PATCH, "int or int list", "`64` or `4,32,32`, at most half the training patch per axis",
           "64", "nnUNetTrainerDiffAugPatchMix", "merge patch size in voxels"),
    EnvVar(LOCK_WAIT_S, "float", ">= 0", "30", "diffaug_synthesize",
           "seconds a part waits for another process that is writing the same part before refusing"),
)

REGISTRY: dict[str, EnvVar] = {v.name: v for v in ENV_VARS}


def markdown_table() -> str:
    """The table of docs/trainer.md, one row per variable."""
    rows = ["| variable | type | allowed | default | read by | meaning |", "|---|---|---|---|---|---|"]
    rows += [f"| `{v.name}` | {v.kind} | {v.allowed} | {v.default} | {v.read_by} | {v.meaning} |" for v in ENV_VARS]
    return "\n".join(rows)


def env_float(name: str, default: float, low: float, high: float) -> float:
    """The variable as a number in [low, high]; ``default`` when unset or empty; refused otherwise."""
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
    """The variable as a yes/no flag; ``default`` when unset or empty; refused otherwise."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise DiffAugError(f"Environment variable {name}={raw!r} must be 1 or 0 (also true/false, yes/no, on/off).")
