"""Synthetic cases are preprocessed with the real plans, incrementally, and half-written cases never count."""
import json
import os
import pickle
import subprocess

import numpy as np
import pytest

from nnunet_diffaug.file_io import _HOST_TAG, temporary_name
from nnunet_diffaug.raw_dataset import image_file, label_file, load_dataset_json
from nnunet_diffaug.trainers.preprocess import MARKER_SUFFIX, preprocess_synthetic_cases
from support import EXAMPLE_NAME, make_stand_in_synthetic_set, private_copy_of_example, set_nnunet_env


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.fixture
def setup(planned_example, tmp_path, monkeypatch):
    source, splits = planned_example
    root = private_copy_of_example(source, tmp_path / "nnunet")  # the synthetic set it adds stays its own
    set_nnunet_env(monkeypatch, root)
    raw = root / "raw"
    synth = make_stand_in_synthetic_set(raw, EXAMPLE_NAME, 0, splits[0]["train"], 3, dataset_id=950)
    plans = json.loads((root / "preprocessed" / EXAMPLE_NAME / "nnUNetPlans.json").read_text())
    real_json = load_dataset_json(raw / EXAMPLE_NAME)
    out = tmp_path / "synthetic_preprocessed"
    return synth, plans, real_json, out, root


def test_incremental_preprocessing_with_the_real_plans(setup):
    synth, plans, real_json, out, root = setup
    ids = preprocess_synthetic_cases(synth, real_json, plans, "3d_fullres", out, verbose=False)
    assert ids == ["synth_00000", "synth_00001", "synth_00002"]

    # the output is what nnU-Net itself makes of a case with these plans: same spacing, same normalisation
    with open(out / "synth_00000.pkl", "rb") as f:
        props = pickle.load(f)
    with open(root / "preprocessed" / EXAMPLE_NAME / "nnUNetPlans_3d_fullres" / "chest_000.pkl", "rb") as f:
        real_props = pickle.load(f)
    assert props["spacing"] == real_props["spacing"]
    import blosc2
    data = blosc2.open(str(out / "synth_00000.b2nd"), mode="r")[:]
    assert abs(float(np.mean(data))) < 3 and 0.1 < float(np.std(data)) < 3  # CT-normalised, not HU

    # rerun: nothing is redone
    before = _mtimes(out)
    assert preprocess_synthetic_cases(synth, real_json, plans, "3d_fullres", out, verbose=False) == ids
    assert _mtimes(out) == before

    # a changed raw case is redone, and only that one
    label = label_file(synth, "synth_00001", ".nii.gz")
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10 ** 9))
    preprocess_synthetic_cases(synth, real_json, plans, "3d_fullres", out, verbose=False)
    after = _mtimes(out)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed and all(k.startswith("synth_00001") for k in changed)

    # a different configuration fingerprint (e.g. re-planned spacing) invalidates everything
    replanned = json.loads(json.dumps(plans))
    replanned["foreground_intensity_properties_per_channel"]["0"]["mean"] += 1.0
    preprocess_synthetic_cases(synth, real_json, replanned, "3d_fullres", out, verbose=False)
    assert all(_mtimes(out)[f"synth_0000{i}{MARKER_SUFFIX}"] != after[f"synth_0000{i}{MARKER_SUFFIX}"] for i in range(3))


def test_half_written_and_vanished_cases_are_not_used(setup):
    synth, plans, real_json, out, _ = setup
    preprocess_synthetic_cases(synth, real_json, plans, "3d_fullres", out, verbose=False)
    # a raw case whose label was never written (killed synthesis) and a case deleted by the user
    label_file(synth, "synth_00002", ".nii.gz").unlink()
    image_file(synth, "synth_00001", 0, ".nii.gz").unlink()
    # leftovers of a killed preprocessing run (its process is gone) and of one still running (this one)
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = out / f".partial-{dead.pid}-{_HOST_TAG}-synth_00000"
    leftover.mkdir()
    (leftover / "synth_00000.b2nd").write_bytes(b"garbage")
    in_flight = out / temporary_name("synth_00007")
    in_flight.mkdir()
    ids = preprocess_synthetic_cases(synth, real_json, plans, "3d_fullres", out, verbose=False)
    assert ids == ["synth_00000"]
    assert not leftover.exists() and in_flight.exists()  # never touch a live writer's files
    in_flight.rmdir()
    assert not any(p.name.startswith(("synth_00001", "synth_00002", ".partial")) for p in out.iterdir())
