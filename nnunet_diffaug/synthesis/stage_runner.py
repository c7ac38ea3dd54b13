"""The training loop every synthesizer stage shares (image autoencoder and diffusion, label autoencoder and
diffusion): resumable from its last checkpoint, loss curves and log lines as it goes, a weights-only file
at the end. What a stage computes per step comes in as a function; seeding follows the step, so a resumed
run ends exactly like an uninterrupted one.

Under torchrun (see :mod:`distributed`) every process runs this loop on its own batches; the logged losses are
their mean, and only the main process writes checkpoints, plots and log lines.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.synthesis import checkpoint as ckpt
from nnunet_diffaug.synthesis import distributed
from nnunet_diffaug.synthesis.ema import EMA_MODULE
from nnunet_diffaug.synthesis.plotting import plot_losses
from nnunet_diffaug.synthesis.synthesizer import CONFIG_FILE, checkpoint_file, final_file

INIT_STEP = 2**31 - 1  # a step no training step uses: it seeds weight initialisation


class TrainingLog:
    """Appends to training_log.txt; echoes to the console when verbose. Silent in all but the main process, so
    a run of N processes logs each line once."""

    def __init__(self, path: Path, verbose: bool):
        self.path, self.verbose = path, verbose

    def __call__(self, msg: str) -> None:
        if not distributed.is_main_process():
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if self.verbose:
            print(line, flush=True)


def run_stage(stage: str, folder: Path, total_steps: int, checkpoint_every: int,
               modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
               step_fn: Callable[[int], dict[str, float]], extra_state: dict, final_modules: list[str],
               log: TrainingLog, progress: bool, stop_after: int | None = None) -> dict[str, list[float]]:
    """Runs (or resumes) one stage. Returns its loss history. Saves a final weights-only file at the end."""
    from tqdm import tqdm
    cpath = checkpoint_file(folder, stage)
    start, losses = _resume(stage, cpath, total_steps, modules, optimizers, extra_state, log)

    def save_checkpoint(step: int) -> None:
        distributed.check_replicas_agree(modules, stage)
        if distributed.is_main_process():
            _save_checkpoint(cpath, stage, step, losses, modules, optimizers, extra_state)

    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc=stage,
               disable=not progress or not distributed.is_main_process(), dynamic_ncols=True)
    latest = {k: _measured(v)[-1] for k, v in losses.items() if _measured(v)}  # the postfix shows the last value
    for step in bar:
        parts = distributed.mean_over_processes(step_fn(step))
        if not all(v is None or math.isfinite(v) for v in parts.values()):
            raise DiffAugError(f"{stage} loss became {parts} at step {step} ({folder}): training diverged. Lower the "
                               f"learning rate in a config file (--preset your.json, see {folder / CONFIG_FILE}) and "
                               f"pass --overwrite to start over.")
        for k, v in parts.items():  # None: a loss not measured at this step (e.g. the consistency loss)
            losses.setdefault(k, []).append(v)
            if v is not None:
                latest[k] = v
        bar.set_postfix({k: f"{v:.4g}" for k, v in latest.items()})
        done = step + 1
        if done % checkpoint_every == 0 and done < total_steps:
            save_checkpoint(done)
            if distributed.is_main_process():  # long runs can be watched while they train
                plot_losses(folder / f"{stage}_losses.png", losses, f"{stage} ({folder.parent.parent.name}, "
                            f"{folder.name}), step {done}")
            log(f"{stage}: step {done}, " + ", ".join(f"{k} {_mean(v[-checkpoint_every:])}"
                                                       for k, v in losses.items()))
        if stop_after is not None and done >= stop_after and done < total_steps:
            save_checkpoint(done)
            log(f"{stage}: stopped at step {done} as asked (stop_after); rerun to continue")
            distributed.barrier()  # the checkpoint is on disk before any process looks for it
            return losses
    bar.close()
    distributed.check_replicas_agree(modules, stage)
    if distributed.is_main_process():
        _save_final(folder, stage, total_steps, losses, modules, final_modules, extra_state)
        cpath.unlink(missing_ok=True)
        plot_losses(folder / f"{stage}_losses.png", losses, f"{stage} ({folder.parent.parent.name}, {folder.name})")
    log(f"{stage}: finished; " + ", ".join(f"{k} first {_mean(_measured(v)[:20])} -> last {_mean(_measured(v)[-20:])}"
                                           for k, v in losses.items()))
    distributed.barrier()  # the final file is on disk before any process looks for it
    return losses


def _measured(values: list) -> list[float]:
    """The values of a loss series at the steps where it was measured."""
    return [v for v in values if v is not None]


def _mean(values: list) -> str:
    measured = _measured(values)
    return f"{np.mean(measured):.4g}" if measured else "n/a"


def _resume(stage: str, cpath: Path, total_steps: int, modules: dict[str, nn.Module],
            optimizers: dict[str, torch.optim.Optimizer], extra_state: dict,
            log: TrainingLog) -> tuple[int, dict[str, list[float]]]:
    """Loads the stage's checkpoint into the modules and optimizers, if there is one. Returns (step, losses)."""
    if not cpath.is_file():
        log(f"{stage}: starting, {total_steps} steps")
        return 0, {}
    tensors, state = ckpt.load_checkpoint(cpath)
    for name, m in modules.items():
        saved = ckpt.unprefixed(name, tensors)
        if not saved and name == EMA_MODULE:  # a checkpoint from before EMA: it starts from the raw weights
            log(f"{stage}: {cpath.name} has no EMA weights; the EMA starts from the current weights")
            continue
        m.load_state_dict(saved)
    for name, opt in optimizers.items():
        ckpt.optimizer_from_flat(f"opt_{name}", opt, tensors, state["optimizers"][name])
    extra_state.update(state.get("extra", {}))
    log(f"{stage}: resuming from step {int(state['step'])} of {total_steps} ({cpath.name})")
    return int(state["step"]), state["losses"]


def _save_checkpoint(cpath: Path, stage: str, step: int, losses: dict[str, list[float]],
                     modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                     extra_state: dict) -> None:
    tensors, opt_json = {}, {}
    for name, m in modules.items():
        tensors.update(ckpt.prefixed(name, m.state_dict()))
    for name, opt in optimizers.items():
        t, j = ckpt.optimizer_to_flat(f"opt_{name}", opt)
        tensors.update(t)
        opt_json[name] = j
    ckpt.save_checkpoint(cpath, tensors, {"stage": stage, "step": step, "losses": losses,
                                          "optimizers": opt_json, "extra": extra_state})


def _save_final(folder: Path, stage: str, total_steps: int, losses: dict[str, list[float]],
                modules: dict[str, nn.Module], final_modules: list[str], extra_state: dict) -> None:
    tensors = {}
    for name in final_modules:
        tensors.update(ckpt.prefixed(name, modules[name].state_dict()))
    ckpt.save_checkpoint(final_file(folder, stage), tensors, {"stage": stage, "step": total_steps, "finished": True,
                                                              "losses": losses, **extra_state})


def learning_rate_at(step: int, base: float, total: int, schedule: str, warmup: int) -> float:
    """Stateless schedule (a function of the step only), so resuming needs no scheduler state."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(total - warmup, 1)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
