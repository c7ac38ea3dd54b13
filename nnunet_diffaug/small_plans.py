"""A small copy of a dataset's nnU-Net plans, for CPU runs, tests and quick benchmarks.

Written beside the user's plans under a new identifier (train with ``nnUNetv2_train ... -p IDENT``);
the user's plans file is never edited. Only the network width/depth, patch size and batch size
change; spacing, normalisation and ``data_identifier`` stay, so the preprocessed data are shared.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from nnunet_diffaug import paths
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import atomic_write_json, read_json

_CASCADE_CONFIGURATIONS = ("3d_lowres", "3d_cascade_fullres")


def _shrink_configuration(cfg: dict, features: list[int], max_patch: int, patch_size: list[int] | None,
                          batch_size: int) -> dict:
    cfg = copy.deepcopy(cfg)
    kw = cfg["architecture"]["arch_kwargs"]
    n = min(len(features), kw["n_stages"])
    kw["n_stages"] = n
    kw["features_per_stage"] = list(features[:n])
    for key in ("kernel_sizes", "strides", "n_conv_per_stage"):
        kw[key] = kw[key][:n]
    if "n_conv_per_stage_decoder" in kw:
        kw["n_conv_per_stage_decoder"] = kw["n_conv_per_stage_decoder"][: n - 1]
    # the patch must stay divisible by the total downsampling of each axis
    divisor = np.prod(np.array(kw["strides"]), axis=0)
    source = np.array(cfg["patch_size"])
    # an explicit patch size applies to the configurations of its dimensionality; the others are capped
    explicit = patch_size is not None and len(patch_size) == len(source)
    wanted = np.array(patch_size) if explicit else np.minimum(source, max_patch)
    cfg["patch_size"] = [int(max(d, (w // d) * d)) for w, d in zip(wanted, divisor)]
    cfg["batch_size"] = int(batch_size)
    return cfg


def write_small_plans(dataset_name: str, source_plans: str = "nnUNetPlans", target_plans: str = "nnUNetPlansDiffAugSmall",
                      features: list[int] = (4, 8, 16, 32), patch_size: list[int] | None = None, max_patch: int = 32,
                      batch_size: int = 2, overwrite: bool = False) -> Path:
    """Writes ``<target_plans>.json`` beside ``<source_plans>.json`` and returns its path."""
    folder = paths.nnunet_preprocessed() / dataset_name
    src = folder / f"{source_plans}.json"
    if not src.is_file():
        raise DiffAugError(f"{src} does not exist. Run nnUNetv2_plan_and_preprocess -d {dataset_name} first.")
    out = folder / f"{target_plans}.json"
    if out.is_file() and not overwrite:
        raise DiffAugError(f"{out} exists; pass --overwrite to replace it.")
    if patch_size is not None and len(patch_size) not in (2, 3):
        raise DiffAugError(f"--patch-size needs 2 (2d) or 3 (3d) values, got {len(patch_size)}.")
    if target_plans == source_plans:
        raise DiffAugError("The small plans need their own identifier; the source plans are never edited.")
    plans = read_json(src)
    small = copy.deepcopy(plans)
    small["plans_name"] = target_plans
    small["configurations"] = {}
    for name, cfg in plans["configurations"].items():
        if name in _CASCADE_CONFIGURATIONS or "architecture" not in cfg:
            continue  # cascade stages and inheriting configurations are not needed for small runs
        small["configurations"][name] = _shrink_configuration(cfg, list(features), max_patch, patch_size, batch_size)
    if not small["configurations"]:
        raise DiffAugError(f"{src} has no configuration with its own architecture to shrink.")
    atomic_write_json(out, small)
    return out
