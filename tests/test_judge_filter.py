"""Judge-filtered synthesis: a real-trained nnU-Net keeps the candidates it reads correctly.

Candidates are a mix the judge must tell apart: deformed real training cases (images follow their labels)
and the same label maps with noise images (they do not). The judge is a tiny nnU-Net trained on fold 0.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.judge_filter import (SCORES_DIR, SUMMARY_FILE, Judge, blind_classes_note, filter_synthetic_set,
                                         judge_validation_dice)
from nnunet_diffaug.provenance import CASE_RECORDS_DIR, read_provenance
from nnunet_diffaug.raw_dataset import list_cases, load_dataset_json
from nnunet_diffaug.synthetic_sets import find_synthetic_datasets
from nnunet_diffaug.synthetic_writer import SyntheticDatasetWriter
from support import (EXAMPLE_NAME, JUDGE, judge_trained_with_synthetic_cases, judge_validated_on_another_split,
                     make_stand_in_synthetic_set, nnunet_env, nnunet_folders, private_copy_of_example)

pytestmark = pytest.mark.slow
TRAINER, PLANS, CONFIG = JUDGE
N_GOOD = 4


def _add_noise_cases(folder, raw, sources, rng):
    """The candidates' bad half: real label maps with noise images of the real intensity range."""
    prov = read_provenance(folder)
    writer = SyntheticDatasetWriter(folder, load_dataset_json(raw / EXAMPLE_NAME), prov)
    real = list_cases(raw / EXAMPLE_NAME)
    for i, source in enumerate(sources):
        image = sitk.ReadImage(real[source]["images"][0])
        arr = sitk.GetArrayFromImage(image).astype(np.float32)
        noise = sitk.GetImageFromArray(rng.normal(arr.mean(), arr.std(), arr.shape).astype(np.float32))
        noise.CopyInformation(image)
        writer.write_case(f"synth_{100 + i:05d}", [noise], sitk.ReadImage(real[source]["label"]),
                          {"source_case": source, "kind": "noise"})
    writer.finalize()


@pytest.fixture(scope="module")
def judged(planned_example, judged_example, tmp_path_factory):
    _, splits = planned_example
    root = private_copy_of_example(judged_example, tmp_path_factory.mktemp("judge"), with_results=True)
    with nnunet_folders(root):
        raw, train = root / "raw", splits[0]["train"]
        candidates = make_stand_in_synthetic_set(raw, EXAMPLE_NAME, 0, train, N_GOOD, dataset_id=971)
        _add_noise_cases(candidates, raw, train[:N_GOOD], np.random.default_rng(0))
        judge = Judge(root / "results" / EXAMPLE_NAME / f"{TRAINER}__{PLANS}__{CONFIG}", use_mirroring=False)
        yield root, splits, candidates, judge


def test_the_kept_cases_are_the_ones_the_judge_reads_and_every_score_is_recorded(judged, tmp_path):
    root, _, candidates, judge = judged
    out = root / "raw" / "Dataset972_ChestCTSlabsSynthF0"
    summary = filter_synthetic_set(candidates, out, judge, keep=N_GOOD, progress=False)
    scores = {c: s["score"] for c, s in summary["scores"].items()}
    noise = {c for c in scores if c.startswith("synth_001")}
    print("judge scores:", {c: round(v, 3) for c, v in scores.items()})
    assert len(scores) == 2 * N_GOOD
    # the filtered set reads better than the candidates it came from, and the noise cases are the ones dropped
    # (measured with this 4-epoch judge: deformed real 0.15-0.22, noise 0.05-0.10)
    assert summary["score_kept"]["min"] > summary["score_dropped"]["max"]
    assert summary["score_kept"]["mean"] > 1.3 * np.mean(list(scores.values()))
    assert set(summary["kept"]).isdisjoint(noise) and set(summary["dropped"]) == noise
    kept = list_cases(out)
    assert sorted(kept) == summary["kept"]
    record = json.loads((out / CASE_RECORDS_DIR / f"{summary['kept'][0]}.json").read_text())
    assert record["judge_score"] == pytest.approx(scores[summary["kept"][0]]) and record["candidate_of"] == candidates.name
    prov = read_provenance(out)
    assert prov.generator["judge_filter"]["candidates"] == 2 * N_GOOD and prov.fold == 0
    assert json.loads((out / SUMMARY_FILE).read_text())["kept"] == summary["kept"]
    # a rerun reuses the stored scores and cases
    again = filter_synthetic_set(candidates, out, judge, keep=N_GOOD, progress=False)
    assert again["kept"] == summary["kept"] and again["scores"] == summary["scores"]


def test_a_floor_nobody_reaches_keeps_what_passes_and_says_so(judged, tmp_path):
    root, _, candidates, judge = judged
    with pytest.raises(DiffAugError, match=r"Only 0 of 8 candidates reach --min-class-dice 1.0"):
        filter_synthetic_set(candidates, tmp_path / "Dataset973_X", judge, keep=2, min_class_dice=1.0, progress=False)


def _copy_model(judge, tmp_path, edit):
    folder = tmp_path / judge.model_folder.name
    shutil.copytree(judge.model_folder, folder)
    edit(folder)
    return Judge(folder, use_mirroring=False)


def test_judges_of_another_fold_dataset_or_trained_on_synthetic_cases_are_refused(judged, tmp_path):
    root, splits, candidates, judge = judged

    def other_split(folder):  # validated on cases that are not fold 0's validation cases
        judge_validated_on_another_split(folder, splits)

    def synthetic_trained(folder):
        judge_trained_with_synthetic_cases(folder)

    def other_dataset(folder):
        plans = folder / "plans.json"
        plans.write_text(json.dumps({**json.loads(plans.read_text()), "dataset_name": "Dataset004_Hippocampus"}))

    for edit, message in ((other_split, r"trained on another fold or split"),
                          (synthetic_trained, r"trained with synthetic cases"),
                          (other_dataset, r"trained on Dataset004_Hippocampus")):
        bad = _copy_model(judge, tmp_path / edit.__name__, edit)
        out = tmp_path / f"out_{edit.__name__}"
        with pytest.raises(DiffAugError, match=message):
            filter_synthetic_set(candidates, out, bad, keep=2, progress=False)
        assert not out.exists()  # refused before anything is written


def _validation_dice(folder, dice_by_value):
    """Sets the judge's per-class validation Dice in its fold 0 summary.json."""
    summary = folder / "fold_0" / "validation" / "summary.json"
    data = json.loads(summary.read_text())
    for value, dice in dice_by_value.items():
        data["mean"][str(value)]["Dice"] = dice
    summary.write_text(json.dumps(data))


def test_a_judge_blind_to_a_class_is_named_with_that_class(judged, tmp_path, capsys):
    root, _, candidates, judge = judged
    real_json = load_dataset_json(root / "raw" / EXAMPLE_NAME)
    labels = {n: v for n, v in real_json["labels"].items() if n != "background"}
    blind_name = sorted(labels)[0]
    blind = _copy_model(judge, tmp_path / "blind", lambda f: _validation_dice(
        f, {v: (0.02 if n == blind_name else 0.8) for n, v in labels.items()}))
    note = blind_classes_note(blind, 0, judge_validation_dice(blind, 0, real_json), "judge filtering")
    assert f"{blind_name} (Dice 0.02)" in note and str(blind.model_folder) in note
    assert not any(f"{n} (Dice" in note for n in labels if n != blind_name)
    sighted = _copy_model(judge, tmp_path / "sighted", lambda f: _validation_dice(f, {v: 0.8 for v in labels.values()}))
    assert blind_classes_note(sighted, 0, judge_validation_dice(sighted, 0, real_json), "judge filtering") is None
    # filtering says so on stderr and records the judge's validation Dice beside its scores
    summary = filter_synthetic_set(candidates, tmp_path / "Dataset974_X", blind, keep=2, progress=False)
    assert f"{blind_name} (Dice 0.02)" in capsys.readouterr().err
    assert summary["judge_validation_dice"] == {n: (0.02 if n == blind_name else 0.8) for n in labels}


_FILTER_SCRIPT = """
import sys
from pathlib import Path
from nnunet_diffaug.judge_filter import Judge, filter_synthetic_set
filter_synthetic_set(Path(sys.argv[1]), Path(sys.argv[2]), Judge(Path(sys.argv[3]), use_mirroring=False), keep=int(sys.argv[4]),
                     progress=False)
"""


def test_kill_9_during_filtering_loses_no_finished_work(judged, tmp_path):
    root, _, candidates, judge = judged
    fresh = candidates.parent / "Dataset974_ChestCTSlabsSynthF0"
    shutil.copytree(candidates, fresh, ignore=shutil.ignore_patterns(SCORES_DIR))
    out = root / "raw" / "Dataset975_ChestCTSlabsSynthF0"
    args = [sys.executable, "-c", _FILTER_SCRIPT, str(fresh), str(out), str(judge.model_folder), str(N_GOOD)]
    proc = subprocess.Popen(args, env=nnunet_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scores = fresh / SCORES_DIR
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if scores.is_dir() and len(list(scores.glob("[!.]*.json"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the filter finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    judged_before = {p.name: p.stat().st_mtime_ns for p in scores.glob("[!.]*.json")}
    assert len(judged_before) >= 2
    for p in scores.glob("[!.]*.json"):
        json.loads(p.read_text())  # every stored score is complete JSON
    # the rerun keeps every score stored before the kill and finishes the set
    summary = filter_synthetic_set(fresh, out, judge, keep=N_GOOD, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in scores.glob("[!.]*.json") if p.name in judged_before} == judged_before
    assert len(summary["scores"]) == 2 * N_GOOD and sorted(list_cases(out)) == summary["kept"]
    assert read_provenance(out).generator["judge_filter"]["candidates_dataset"] == fresh.name


def test_console_script_filters_any_generator_and_hides_the_candidates_from_trainers(judged, capsys):
    from nnunet_diffaug import cli
    root, _, _, judge = judged
    argv = ["-d", EXAMPLE_NAME, "-f", "0", "-c", CONFIG, "-n", "2", "--generator", "randomised", "-p", PLANS,
            "--judge", judge.model_folder.name, "--candidates", "4", "-o", "976"]
    with nnunet_folders(root):
        cli.synthesize_entry(argv)
        out = root / "raw" / "Dataset976_ChestCTSlabsSynthF0"
        assert capsys.readouterr().out.strip().endswith(out.name)
        summary = json.loads((out / SUMMARY_FILE).read_text())
        assert len(summary["scores"]) == 4 and sorted(list_cases(out)) == summary["kept"] and len(summary["kept"]) == 2
        candidates = Path(summary["candidates_dataset"])
        assert read_provenance(out).generator["kind"] == "domain_randomised"
        # trainers and evaluation find the filtered set, never its candidates
        visible = find_synthetic_datasets(root / "raw", EXAMPLE_NAME, 0)
        assert out in visible and candidates not in visible
        assert candidates in find_synthetic_datasets(root / "raw", EXAMPLE_NAME, 0, include_candidates=True)
        # refusals before any work
        for bad, message in ((argv[:-4] + ["--candidates", "1"], "--candidates 1 must be at least -n 2"),
                             (argv[:12] + ["--candidates", "4"], "need --judge MODEL"),
                             (argv[:12] + ["--judge", "nnUNetTrainer__nnUNetPlans"], "neither a folder nor a model name")):
            with pytest.raises(SystemExit):
                cli.synthesize_entry(bad)
            assert message in capsys.readouterr().err
