"""Training one synthesizer with several processes (torchrun + DistributedDataParallel).

torchrun starts N copies of the same command and tells each its place through environment variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Every process holds a whole copy of each model and
draws its own batches; DDP averages the gradients during backward, so every copy takes the same optimizer step
and the copies stay equal. Process 0 (the main process) alone writes files: checkpoints, logs, loss plots,
montages, the config. The others wait at a barrier wherever they are about to read what it wrote.

Without torchrun every helper here does nothing, so single-process training is unchanged.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator

import torch
from torch import nn

from nnunet_diffaug.errors import DiffAugError

GROUP_TIMEOUT = datetime.timedelta(hours=24)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def _uses_nccl() -> bool:
    return is_distributed() and torch.distributed.get_backend() == "nccl"


def _collective_device() -> torch.device:
    """nccl moves only CUDA tensors, gloo only CPU ones: small collectives (losses, checksums) go there."""
    return torch.device("cuda", torch.cuda.current_device()) if _uses_nccl() else torch.device("cpu")


def barrier() -> None:
    if not is_distributed():
        return
    if _uses_nccl():  # naming the GPU spares nccl a guess (and a warning) about which one this process uses
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch.distributed.barrier()


def _device_of_this_process(device: torch.device) -> torch.device:
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DiffAugError(f"multi-process training runs on CPU (gloo) or CUDA (nccl), not on {device.type}.")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise DiffAugError(f"torchrun started more processes on this machine than torch sees GPUs "
                           f"({torch.cuda.device_count()}): one process per GPU.")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Yields the device this process trains on. Under torchrun: joins the process group (gloo on the CPU,
    nccl on CUDA; one GPU per process, LOCAL_RANK) and leaves it at the end. Otherwise: ``device`` as is."""
    if not launched_by_torchrun() or is_distributed():  # single process, or a caller that set up its own group
        yield device if not is_distributed() else _device_of_this_process(device)
        return
    device = _device_of_this_process(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # process 0 alone hashes and preprocesses new unlabelled images before the others may read them: with a large
    # pool that takes longer than the collectives' default 10 minutes, so the others wait up to a day
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=GROUP_TIMEOUT)
    try:
        yield device
    finally:
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first (it may write files), the others after it (they read them)."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def for_training(module: nn.Module) -> nn.Module:
    """What forward and backward go through: under torchrun a DDP wrapper (its backward averages the gradients
    over the processes), else the module itself. Checkpoints keep saving the module itself, so their keys
    are the same whatever the number of processes."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel
    # no device_ids: inputs are already on this process's device, and DDP must not rebuild our Condition
    return DistributedDataParallel(module)


def mean_over_processes(values: dict[str, float | None]) -> dict[str, float | None]:
    """Each process's losses are those of its own batch; their mean is the loss of the whole global batch, the
    same number in every process (so a diverged step stops all of them together). Every process passes the same
    names; a value None (not measured in that process at this step, e.g. the consistency loss when no sample of
    its batch qualified) is left out of the mean, and the mean is None where no process measured it."""
    if not is_distributed():
        return values
    names = list(values)
    t = torch.tensor([[0.0, 0.0] if values[k] is None else [values[k], 1.0] for k in names], dtype=torch.float64,
                     device=_collective_device())
    torch.distributed.all_reduce(t)
    return {k: (total / n if n else None) for k, (total, n) in zip(names, t.tolist())}


def value_of_main_process(value: Any) -> Any:
    """The main process's ``value`` in every process: for numbers estimated from data (latent scale factors),
    which float reduction order could make differ in their last bits between GPUs."""
    if not is_distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)  # nccl: through the GPU set in process_group
    return box[0]


def check_replicas_agree(modules: dict[str, nn.Module], stage: str) -> None:
    """Every process must hold the same weights. A module trained outside DDP would drift apart silently
    (only process 0's copy is saved), so the weights' checksums are compared wherever a checkpoint is written."""
    if not is_distributed():
        return
    sums = torch.tensor([sum(float(p.detach().double().sum()) for p in m.parameters()) for m in modules.values()],
                        dtype=torch.float64, device=_collective_device())
    low, high = sums.clone(), sums.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(low, high):
        differ = [name for name, lo, hi in zip(modules, low.tolist(), high.tolist()) if lo != hi]
        raise DiffAugError(f"{stage}: the processes' copies of {differ} have drifted apart; their gradients "
                           f"were not averaged.")


def relaunch_under_torchrun(nproc: int, command: str, args: list[str]) -> None:
    """Runs ``command args`` as ``nproc`` processes on this machine and waits for them, as
    ``torchrun --standalone --nproc_per_node nproc command args`` would (standalone: a free local port, no
    rendezvous server to start)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun
    try:
        # '--': what follows is the command's, even a flag that abbreviates one of torchrun's (--nproc)
        torchrun(["--standalone", f"--nproc_per_node={nproc}", "--no-python", "--", command, *args])
    except ChildFailedError:
        raise DiffAugError(f"{command}: at least one of its {nproc} training processes failed; its own message "
                           f"is above.") from None
