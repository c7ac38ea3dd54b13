"""Training a synthesizer with several processes: torchrun, DistributedDataParallel over gloo on the CPU.

Two processes train a stage and its loss falls; each line of the training log is written once; a run moves
from one process to two and, killed, from two back to one, continuing where it stopped.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from support import EXAMPLE_ID, EXAMPLE_NAME, console_script, nnunet_env, nnunet_folders, private_copy_of_example

from nnunet_diffaug.paths import synthesizer_folder
from nnunet_diffaug.synthesis.checkpoint import read_state
from nnunet_diffaug.synthesis.config import load_config
from nnunet_diffaug.synthesis.synthesizer import Synthesizer
from nnunet_diffaug.synthesis.training import train_synthesizer

pytestmark = pytest.mark.slow

SWITCH_AT = 10  # the step at which the one-process run of the first test stops and two processes take over
MICRO = {"base": "tiny", "autoencoder": {"steps": 20}, "diffusion": {"steps": 20, "scale_factor_batches": 2},
         "checkpoint_every": 5, "montage_cases": 2}
# the same autoencoder, longer (its steps do not change its batches or learning rate), so a kill lands mid-stage
MICRO_LONG_AUTOENCODER = {**MICRO, "autoencoder": {"steps": 40},
                          "diffusion": {"steps": 4, "scale_factor_batches": 2}}


def _write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


def _train_arguments(config: Path) -> list[str]:
    return ["-d", str(EXAMPLE_ID), "-f", "0", "-c", "2d", "--preset", str(config), "-device", "cpu", "--seed", "0"]


def _torchrun(nproc: int, config: Path) -> list[str]:
    """The command of docs/multi_gpu.md: torchrun (as python -m torch.distributed.run) around the installed console script."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            console_script("diffaug_train_synthesizer"), *_train_arguments(config)]


def _synthesizer_folder(root: Path) -> Path:
    with nnunet_folders(root):
        return synthesizer_folder(EXAMPLE_NAME, "2d", 0)


def _train_in_this_process(root: Path, config: Path, stop_after: int | None = None) -> Path:
    with nnunet_folders(root):
        return train_synthesizer(EXAMPLE_ID, "2d", 0, load_config(str(config)), device="cpu", seed=0,
                                 progress=False, stop_after=stop_after)


def _loss_history(path: Path, name: str) -> list[float]:
    return read_state(path)["losses"][name]


def _log_lines(folder: Path) -> list[str]:
    """training_log.txt without its timestamps."""
    return [line.split(" ", 2)[2] for line in (folder / "training_log.txt").read_text().splitlines()]


def _count_starting_with(lines: list[str], prefix: str) -> int:
    return sum(line.startswith(prefix) for line in lines)


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(read_state(path)["step"])
    except Exception:  # not written yet, or being replaced
        return None


def _kill_with_workers(proc: subprocess.Popen) -> None:
    """SIGKILL to the launching process and to torchrun's workers, which it starts in sessions of their own: a
    crash, no cleanup."""
    if proc.poll() is not None:
        return
    workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        os.killpg(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)  # orphans are reaped by init; until then they hold the folder lock


@pytest.fixture(scope="module")
def one_process_start(planned_example, tmp_path_factory):
    """A run started by one process and stopped at SWITCH_AT: (root, config, its autoencoder losses)."""
    tmp = tmp_path_factory.mktemp("one_then_two")
    root = private_copy_of_example(planned_example[0], tmp / "nnunet")
    config = _write_config(tmp / "micro.json", MICRO)
    folder = _train_in_this_process(root, config, stop_after=SWITCH_AT)
    return root, config, _loss_history(folder / "autoencoder_checkpoint.safetensors", "l1")


def test_two_processes_continue_a_one_process_run_train_the_next_stage_and_write_each_log_line_once(
        one_process_start):
    root, config, one_process_losses = one_process_start
    assert len(one_process_losses) == SWITCH_AT
    done = subprocess.run(_torchrun(2, config), env=nnunet_env(root), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    folder = _synthesizer_folder(root)
    assert done.stdout.strip().splitlines() == [str(folder)]  # printed once, not once per process

    # continued, not restarted: the first SWITCH_AT losses are the one-process run's
    autoencoder = _loss_history(folder / "autoencoder.safetensors", "l1")
    assert len(autoencoder) == 20 and autoencoder[:SWITCH_AT] == one_process_losses
    # the diffusion stage, trained by the two processes from its start, learns
    diffusion = _loss_history(folder / "diffusion.safetensors", "mse")
    assert len(diffusion) == 20 and np.mean(diffusion[-5:]) < 0.8 * np.mean(diffusion[:5])

    # one writer: every line once (two writers would write each twice)
    lines = _log_lines(folder)
    assert _count_starting_with(lines, "training synthesizer") == 2  # the one-process run's and this run's
    assert sum(line.endswith(", 2 processes") for line in lines) == 1
    assert _count_starting_with(lines, f"autoencoder: resuming from step {SWITCH_AT} of 20") == 1
    for stage, steps in (("autoencoder", [15]), ("diffusion", [5, 10, 15])):
        for step in steps:
            assert _count_starting_with(lines, f"{stage}: step {step},") == 1, (stage, step)
        assert _count_starting_with(lines, f"{stage}: finished") == 1
    assert _count_starting_with(lines, "done:") == 1
    for name in ("diffusion_losses.png", "diffusion_montage.png", "autoencoder_montage.png"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob("*_checkpoint.safetensors"))

    # saved as by one process (no DDP 'module.' prefix): the synthesizer loads and paints
    synthesizer = Synthesizer.load(folder, torch.device("cpu"))
    labels = np.zeros((1, 64, 64), dtype=np.int64)
    image = synthesizer.generate(labels, synthesizer.sampler(steps=2), torch.Generator().manual_seed(0))
    assert image.shape[-2:] == (64, 64) and np.isfinite(image).all()


def test_a_two_process_run_started_with_nproc_and_killed_mid_stage_resumes_with_one_process(one_process_start, tmp_path, planned_example):
    _, _, one_process_losses = one_process_start
    root = private_copy_of_example(planned_example[0], tmp_path / "nnunet")
    config = _write_config(tmp_path / "micro_long.json", MICRO_LONG_AUTOENCODER)
    folder = _synthesizer_folder(root)
    checkpoint = folder / "autoencoder_checkpoint.safetensors"
    command = [console_script("diffaug_train_synthesizer"), *_train_arguments(config), "--nproc", "2"]
    proc = subprocess.Popen(command, env=nnunet_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # --nproc: the command reruns itself under torchrun
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and (_checkpoint_step(checkpoint) or 0) < 10:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
    finally:
        _kill_with_workers(proc)
    killed_at = _checkpoint_step(checkpoint)
    assert killed_at is not None and 10 <= killed_at < 40
    assert not (folder / "autoencoder.safetensors").exists()
    two_process_losses = _loss_history(checkpoint, "l1")
    assert np.mean(two_process_losses[-3:]) < 0.7 * np.mean(two_process_losses[:3])  # two processes learn
    # same initial weights, and process 0 draws the single-process batch: a different step-0 loss means the
    # second process drew another batch and the logged loss is the mean of both
    assert two_process_losses[0] != one_process_losses[0]
    assert abs(two_process_losses[0] - one_process_losses[0]) < 0.5 * one_process_losses[0]

    _train_in_this_process(root, config)
    lines = _log_lines(folder)
    assert _count_starting_with(lines, f"autoencoder: resuming from step {killed_at} of 40") == 1
    for step in range(5, 40, 5):  # written once, by process 0 before the kill or by the single process after
        written = _count_starting_with(lines, f"autoencoder: step {step},")
        assert written in ((0, 1) if step == killed_at else (1,)), step  # the kill may fall between save and log
    autoencoder = _loss_history(folder / "autoencoder.safetensors", "l1")
    assert len(autoencoder) == 40 and autoencoder[:killed_at] == two_process_losses
    assert (folder / "diffusion.safetensors").is_file()
    Synthesizer.load(folder, torch.device("cpu"))
