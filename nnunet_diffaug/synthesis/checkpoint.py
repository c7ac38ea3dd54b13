"""Checkpoints as safetensors files: tensors plus a JSON state in the file's metadata. Nothing is pickled.

One file per save, written to a temporary sibling and moved into place, so weights, optimizer
moments and the step counter can never disagree after a crash.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import atomic_path, file_sha256

_STATE_KEY = "diffaug_state"


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], state: dict) -> None:
    from safetensors.torch import save_file
    # safetensors refuses views and shared storage: store contiguous CPU copies
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={_STATE_KEY: json.dumps(state)})


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise DiffAugError(f"{path} does not exist.")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise DiffAugError(f"{path} is not a readable safetensors checkpoint ({e}). Delete it to start that "
                           f"stage over.") from None
    try:
        state = json.loads(meta.get(_STATE_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise DiffAugError(f"{path}: its metadata is not valid JSON ({e}).") from None
    return tensors, state


def read_state(path: str | os.PathLike) -> dict:
    """Only the JSON state of a checkpoint (cheap: no tensors are read)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(_STATE_KEY, "{}"))


def prefixed(prefix: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state_dict.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def optimizer_to_flat(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Splits an optimizer state dict into tensors (moments, step counters) and a JSON part."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{name}.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(name: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        json_part: dict) -> None:
    state: dict[int, dict] = {}
    p = name + "."
    for k, v in tensors.items():
        if k.startswith(p):
            pid, key = k[len(p):].split(".", 1)
            state.setdefault(int(pid), {})[key] = v
    for k, v in json_part.get("scalars", {}).items():
        pid, key = k.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": json_part["param_groups"]})


def final_file(folder: str | os.PathLike, stage: str) -> Path:
    """The finished weights of a training stage (image or label side): ``<folder>/<stage>.safetensors``."""
    return Path(folder) / f"{stage}.safetensors"


def weights_sha256(folder: str | os.PathLike, stages) -> str:
    """sha256 over the final weight files of ``stages`` (image or label side): names the exact model that made
    a synthetic dataset in its provenance."""
    h = hashlib.sha256()
    for stage in stages:
        h.update(file_sha256(final_file(folder, stage)).encode())
    return h.hexdigest()
