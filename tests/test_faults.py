"""Faults lose nothing: SIGKILL during synthetic preprocessing, concurrent writers, held locks."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import folder_lock, temporary_name
from nnunet_diffaug.raw_dataset import load_dataset_json
from nnunet_diffaug.trainers.preprocess import (_CASE_FILE_SUFFIXES, marked_cases,
                                                preprocess_synthetic_cases)
from support import EXAMPLE_NAME, make_stand_in_synthetic_set, nnunet_env, private_copy_of_example

_PREPROCESS_SCRIPT = """
import json, sys
from nnunet_diffaug.raw_dataset import load_dataset_json
from nnunet_diffaug.trainers.preprocess import preprocess_synthetic_cases
synth, real, plans, out = sys.argv[1:5]
preprocess_synthetic_cases(synth, load_dataset_json(real), json.load(open(plans)), "3d_fullres", out, verbose=False)
"""


def _visible_cases_are_complete(folder):
    markers = marked_cases(folder)
    for case in markers:
        assert all((folder / f"{case}{s}").is_file() for s in _CASE_FILE_SUFFIXES), case
    return sorted(markers)


@pytest.mark.slow
def test_sigkill_during_preprocessing_leaves_only_complete_cases_and_rerun_finishes(planned_example, tmp_path):
    source, splits = planned_example
    root = private_copy_of_example(source, tmp_path / "nnunet")  # its synthetic sets must not leak into others
    synth = make_stand_in_synthetic_set(root / "raw", EXAMPLE_NAME, 0, splits[0]["train"], 8, dataset_id=960)
    plans = root / "preprocessed" / EXAMPLE_NAME / "nnUNetPlans.json"
    out = tmp_path / "pre"
    env = nnunet_env(root)
    args = [sys.executable, "-c", _PREPROCESS_SCRIPT, str(synth), str(root / "raw" / EXAMPLE_NAME), str(plans),
            str(out)]
    kills = 0
    for delay_cases in (1, 3):  # kill after the first, then after a few more cases were done
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and len(marked_cases(out)) >= delay_cases:
                break
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        done = _visible_cases_are_complete(out)
        assert len(done) < 8 or proc.returncode == 0
    assert kills >= 1
    ids = preprocess_synthetic_cases(synth, load_dataset_json(root / "raw" / EXAMPLE_NAME),
                                     json.loads(plans.read_text()), "3d_fullres", out, verbose=False)
    assert ids == [f"synth_{i:05d}" for i in range(8)]
    assert _visible_cases_are_complete(out) == ids
    assert not list(out.glob(".partial-*"))


def _hold_lock(folder, started, release):
    with folder_lock(folder):
        started.set()
        release.wait(30)


def test_a_held_lock_makes_a_second_writer_wait_then_refuse(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    started, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, started, release))
    holder.start()
    try:
        assert started.wait(30)
        t0 = time.monotonic()
        with pytest.raises(DiffAugError, match="is locked by another process"):
            with folder_lock(tmp_path, timeout_s=0.5):
                pass
        assert time.monotonic() - t0 >= 0.5  # it waited before refusing
    finally:
        release.set()
        holder.join(30)
    with folder_lock(tmp_path, timeout_s=5):  # free again once the holder is gone
        pass


MICRO_SYNTHESIZER = {"base": "tiny", "autoencoder": {"steps": 10}, "diffusion": {"steps": 10, "scale_factor_batches": 2},
                     "checkpoint_every": 10, "montage_cases": 2}


def _labels(folder):
    return sorted(p.name for p in (folder / "labelsTr").glob("*.nii.gz")) if (folder / "labelsTr").is_dir() else []


@pytest.mark.slow
def test_synthesis_killed_midway_keeps_only_complete_cases_a_second_writer_refuses_and_rerun_completes(
        planned_example, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from support import console_script, run
    root = private_copy_of_example(planned_example[0], tmp_path / "nnunet")
    env = nnunet_env(root)
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(MICRO_SYNTHESIZER))
    run([console_script("diffaug_train_synthesizer"), "-d", "990", "-f", "1", "-c", "3d_fullres", "--preset", str(config),
         "-device", "cpu"], env)
    cmd = [console_script("diffaug_synthesize"), "-d", "990", "-f", "1", "-c", "3d_fullres", "-n", "8", "-o", "970",
           "--sampler", "ddim", "--steps", "8", "-device", "cpu"]
    folder = root / "raw" / "Dataset970_ChestCTSlabsSynthF1"

    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None and len(_labels(folder)) < 2:
        time.sleep(0.02)
    assert first.poll() is None, "synthesis finished before it could be interrupted"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    done = _labels(folder)
    assert 2 <= len(done) < 8
    images = sorted(p.name for p in (folder / "imagesTr").glob("*.nii.gz"))
    assert images == [n.replace(".nii.gz", "_0000.nii.gz") for n in done]  # no half case is visible

    # while another writer holds this part, a second one waits, then refuses clearly and writes nothing
    before = sorted(p.name for p in folder.rglob("*") if p.is_file())
    with folder_lock(folder, name=".diffaug.part0of1.lock"):
        second = run(cmd, {**env, "DIFFAUG_LOCK_WAIT_S": "1"}, expect_ok=False)
    assert second.returncode == 2
    assert "locked by another diffaug_synthesize writing part 0 of 1" in second.stderr
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == before

    run(cmd, env)  # the same command resumes
    assert _labels(folder) == [f"synth_{i:05d}.nii.gz" for i in range(8)]
    assert not [p for p in folder.iterdir() if p.name.startswith(".partial-")]
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 8
    verify_dataset_integrity(str(folder), num_processes=1)


def test_a_marker_still_being_written_is_not_a_case(tmp_path):
    # the atomic write of a marker first creates a hidden temporary of the same suffix; a reader that
    # took it for a case would call it complete, or delete a live writer's file as a "vanished" case
    (tmp_path / temporary_name("synth_00000.diffaug.json")).write_text("{}")
    (tmp_path / "synth_00001.diffaug.json").write_text("{}")
    assert marked_cases(tmp_path) == ["synth_00001"]
