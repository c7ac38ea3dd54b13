"""Table-driven: every bad input is refused with one clear message naming the problem, and nothing is written.

Each row builds its bad input inside a fresh folder, then calls the real entry point. The test
asserts the DiffAugError message and that the folder's content (names, sizes, mtimes) is unchanged.
"""
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffaug import cli
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import atomic_path
from nnunet_diffaug.provenance import SyntheticProvenance
from nnunet_diffaug.raw_dataset import check_case, load_dataset_json, validate_case_id
from nnunet_diffaug.synthetic_writer import SyntheticDatasetWriter
from nnunet_diffaug.trainers.budget import apply_budget_from_env
from nnunet_diffaug.trainers.patch_mix import merge_patch_size
from nnunet_diffaug.trainers.synthetic_source import validate_synthetic_dataset

REAL_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "vessel": 2},
             "numTraining": 1, "file_ending": ".nii.gz"}


# ---------------------------------------------------------------------------------------------- builders

def _write(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 2.0), origin=None) -> str:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing[: img.GetDimension()])
    if origin is not None:
        img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return str(path)


def _good_label():
    arr = np.zeros((4, 8, 8), dtype=np.uint8)
    arr[1:3, 2:6, 2:6] = 1
    arr[2, 3, 3] = 2
    return arr


def _case(tmp, image=None, label=None, image_kwargs=None, label_kwargs=None, ending=".nii.gz"):
    # (SimpleITK reads NaN/Inf in NIfTI files as 0, so those rows use .mha, where they survive)
    image = np.random.default_rng(0).normal(0, 1, (4, 8, 8)).astype(np.float32) if image is None else image
    label = _good_label() if label is None else label
    im = _write(tmp / "imagesTr" / f"c_0000{ending}", image, **(image_kwargs or {}))
    lb = _write(tmp / "labelsTr" / f"c{ending}", label, **(label_kwargs or {}))
    return lambda: check_case("c", [im], lb, REAL_JSON, expected_dimension=3)


def _dataset_json(tmp, content):
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "dataset.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return lambda: load_dataset_json(tmp)


def _json_without(key):
    d = dict(REAL_JSON)
    d.pop(key)
    return d


def _json_labels(labels):
    return {**REAL_JSON, "labels": labels}


def _synthetic(tmp, mutate_json=None, prov_training=("t1",), fold=0, mutate_prov=None):
    prov = SyntheticProvenance(source_dataset="Dataset010_Toy", fold=fold, configuration="3d_fullres",
                               training_cases=list(prov_training), generator={"kind": "test"}, seed=0)
    folder = tmp / "Dataset901_ToySynthF0"
    w = SyntheticDatasetWriter(folder, REAL_JSON, prov)
    img = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.float32))
    w.write_case("s0", [img], sitk.GetImageFromArray(_good_label()), {})
    w.finalize()
    if mutate_json:
        dj = json.loads((folder / "dataset.json").read_text())
        dj.update(mutate_json)
        (folder / "dataset.json").write_text(json.dumps(dj))
    if mutate_prov is not None:
        (folder / "diffaug_provenance.json").write_text(mutate_prov)
    return lambda: validate_synthetic_dataset(folder, REAL_JSON, "Dataset010_Toy", 0, "3d_fullres", ["v1"], True)


def _env(monkeypatch_env, fn):
    def call():
        class T:
            num_epochs = num_iterations_per_epoch = num_val_iterations_per_epoch = 1
        old = {k: os.environ.get(k) for k in monkeypatch_env}
        os.environ.update(monkeypatch_env)
        try:
            fn(T())
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return lambda tmp: call


def _ratio_env(value):
    def build(tmp):
        def call():
            from nnunet_diffaug.env_vars import env_float
            os.environ["DIFFAUG_SYNTHETIC_RATIO"] = value
            try:
                env_float("DIFFAUG_SYNTHETIC_RATIO", 0.3, 0.0, 1.0)
            finally:
                os.environ.pop("DIFFAUG_SYNTHETIC_RATIO")
        return call
    return build


def _cli(entry, argv, env=None):
    def build(tmp):
        for d in ("raw", "preprocessed", "results"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        def call():
            saved = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
            os.environ.update({"nnUNet_raw": str(tmp / "raw"), "nnUNet_preprocessed": str(tmp / "preprocessed"),
                               "nnUNet_results": str(tmp / "results")})
            for k, v in (env or {}).items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            try:
                getattr(cli, entry).__wrapped__([a.replace("{tmp}", str(tmp)) for a in argv])
            finally:
                for k, v in saved.items():
                    os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        return call
    return build


def _synthesize_call(**kwargs):
    """synthesize() as a library call: its own checks run before any dataset or synthesizer is looked at."""
    def build(tmp):
        from nnunet_diffaug.synthesis.synthesize import synthesize
        return lambda: synthesize("Dataset010_Toy", "3d_fullres", 0, 2, **kwargs)
    return build


def _small_plans_existing(tmp):
    folder = tmp / "preprocessed" / "Dataset010_Toy"
    folder.mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps({"configurations": {}}))
    (folder / "nnUNetPlansDiffAugSmall.json").write_text("{}")
    (tmp / "raw" / "Dataset010_Toy").mkdir(parents=True)
    return _cli("small_plans_entry", ["-d", "10"])(tmp)


def _enospc(tmp):
    def call():
        with atomic_path(tmp / "out.json") as t:
            t.write_text("partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    return call


def _writer_wrong_channels(tmp):
    prov = SyntheticProvenance("Dataset010_Toy", 0, "3d_fullres", ["t1"], {"kind": "x"}, 0)
    w = SyntheticDatasetWriter(tmp / "Dataset902_X", REAL_JSON, prov)
    img = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.float32))
    return lambda: w.write_case("s1", [img, img], sitk.GetImageFromArray(_good_label()), {})


def _writer_foreign_folder(tmp):
    (tmp / "Dataset903_Mine").mkdir()
    (tmp / "Dataset903_Mine" / "notes.txt").write_text("my data")
    prov = SyntheticProvenance("Dataset010_Toy", 0, "3d_fullres", ["t1"], {"kind": "x"}, 0)
    return lambda: SyntheticDatasetWriter(tmp / "Dataset903_Mine", REAL_JSON, prov)


# ---------------------------------------------------------------------------------------------- the table

BAD_INPUTS = [
    # dataset.json
    ("dataset.json missing", lambda t: (t.mkdir(parents=True, exist_ok=True), lambda: load_dataset_json(t))[1],
     r"dataset.json does not exist"),
    ("dataset.json not JSON", lambda t: _dataset_json(t, "{labels: oops"), r"dataset.json is not valid JSON"),
    ("dataset.json a list", lambda t: _dataset_json(t, "[1, 2]"), r"must hold a JSON object"),
    ("no channel_names", lambda t: _dataset_json(t, _json_without("channel_names")), r"channel_names"),
    ("no labels", lambda t: _dataset_json(t, _json_without("labels")), r"lacks required key\(s\) \['labels'\]"),
    ("no file_ending", lambda t: _dataset_json(t, _json_without("file_ending")), r"file_ending"),
    ("labels without background", lambda t: _dataset_json(t, _json_labels({"organ": 1})), r"include 'background'"),
    ("negative label", lambda t: _dataset_json(t, _json_labels({"background": 0, "a": -1})), r"non-negative integers"),
    ("float label value", lambda t: _dataset_json(t, _json_labels({"background": 0, "a": 1.5})), r"non-negative"),
    ("boolean label value", lambda t: _dataset_json(t, _json_labels({"background": 0, "a": True})), r"non-negative"),
    ("region-based labels", lambda t: _dataset_json(t, _json_labels({"background": 0, "r": [1, 2]})),
     r"region-based labels"),
    # cases
    ("image/label size mismatch", lambda t: _case(t, image=np.zeros((4, 8, 9), np.float32)), r"differ in geometry"),
    ("image/label spacing mismatch", lambda t: _case(t, image_kwargs={"spacing": (1.0, 1.0, 3.0)}),
     r"differ in geometry"),
    ("image/label origin mismatch", lambda t: _case(t, image_kwargs={"origin": (5.0, 0.0, 0.0)}),
     r"differ in geometry"),
    ("NaN voxels", lambda t: _case(t, image=np.where(_good_label() > 0, np.nan, 0).astype(np.float32),
                                         ending=".mha"), r"NaN or Inf"),
    ("Inf voxels", lambda t: _case(t, image=np.full((4, 8, 8), np.inf, np.float32), ending=".mha"),
     r"NaN or Inf"),
    ("non-integer labels", lambda t: _case(t, label=_good_label().astype(np.float32) * 0.5),
     r"non-integer label values"),
    ("undeclared label value", lambda t: _case(t, label=_good_label() * 3), r"label value\(s\) \[3, 6\].*not declare"),
    ("empty label map", lambda t: _case(t, label=np.zeros((4, 8, 8), np.uint8)), r"is empty"),
    ("2D image where 3D expected", lambda t: _case(t, image=np.zeros((8, 8), np.float32),
                                                   label=_good_label()[1]), r"is 2D, but the dataset's cases are 3D"),
    ("vector pixel image", lambda t: (lambda p: (sitk.WriteImage(sitk.Compose([sitk.Image(8, 8, 4, sitk.sitkFloat32)] * 2),
                                                                 str(p)),
                                                 _case(t), lambda: check_case(
        "c", [str(p)], str(t / "labelsTr" / "c.nii.gz"), REAL_JSON))[2])(t / "vec_0000.nii.gz"),
     r"2 components per voxel"),
    ("unreadable image", lambda t: (_case(t), (t / "imagesTr" / "c_0000.nii.gz").write_bytes(b"not an image"),
                                    lambda: check_case("c", [str(t / "imagesTr" / "c_0000.nii.gz")],
                                                       str(t / "labelsTr" / "c.nii.gz"), REAL_JSON))[2],
     r"c_0000.nii.gz cannot be read as an image"),
    ("missing image", lambda t: (_case(t), lambda: check_case("c", [str(t / "nope_0000.nii.gz")],
                                                              str(t / "labelsTr" / "c.nii.gz"), REAL_JSON))[1],
     r"nope_0000.nii.gz does not exist"),
    # case identifiers
    ("case id with ..", lambda t: lambda: validate_case_id("../etc"), r"Invalid case identifier '../etc'"),
    ("case id with /", lambda t: lambda: validate_case_id("a/b"), r"no path separators"),
    ("hidden case id", lambda t: lambda: validate_case_id(".x"), r"Invalid case identifier"),
    ("empty case id", lambda t: lambda: validate_case_id(""), r"Invalid case identifier"),
    ("case id with space", lambda t: lambda: validate_case_id("a b"), r"Invalid case identifier"),
    # synthetic sets against the real dataset
    ("synthetic channels differ", lambda t: _synthetic(t, {"channel_names": {"0": "MR"}}), r"channel_names"),
    ("synthetic labels differ", lambda t: _synthetic(t, {"labels": {"background": 0, "organ": 1}}), r"labels"),
    ("synthetic file ending differs", lambda t: _synthetic(t, {"file_ending": ".mha"}), r"file_ending"),
    ("synthesizer saw a validation case", lambda t: _synthetic(t, prov_training=("t1", "v1")),
     r"saw 1 validation case"),
    ("synthetic set for another fold", lambda t: _synthetic(t, fold=3), r"made for fold 3"),
    ("provenance not JSON", lambda t: _synthetic(t, mutate_prov="{oops"), r"diffaug_provenance.json is not valid JSON"),
    ("provenance lacks fields", lambda t: _synthetic(t, mutate_prov='{"fold": 0}'), r"lacks required field"),
    ("writer: wrong channel count", _writer_wrong_channels, r"2 channel image\(s\) given, the dataset declares 1"),
    ("writer: foreign folder", _writer_foreign_folder, r"is not a synthetic dataset written by nnunet-diffaug"),
    # environment variables of the trainers
    ("ratio not a number", _ratio_env("lots"), r"DIFFAUG_SYNTHETIC_RATIO='lots' is not a number"),
    ("ratio above 1", _ratio_env("1.5"), r"must lie in \[0.0, 1.0\]"),
    ("ratio negative", _ratio_env("-0.1"), r"must lie in \[0.0, 1.0\]"),
    ("fractional epochs", _env({"DIFFAUG_NUM_EPOCHS": "2.5"}, apply_budget_from_env), r"must be an integer"),
    ("zero iterations", _env({"DIFFAUG_ITERATIONS_PER_EPOCH": "0"}, apply_budget_from_env), r"must lie in"),
    ("seed not a number", _env({"DIFFAUG_SEED": "abc"}, apply_budget_from_env), r"DIFFAUG_SEED='abc' is not a number"),
    ("merge patch not numbers", lambda t: lambda: merge_patch_size("big", [32, 32]), r"must be an integer"),
    ("merge patch wrong axes", lambda t: lambda: merge_patch_size("8,8", [4, 32, 32]), r"needs 3 positive value"),
    # console scripts
    ("unknown dataset id", _cli("small_plans_entry", ["-d", "123"]), r"Unknown dataset '123'"),
    ("small plans already exist", _small_plans_existing, r"exists; pass --overwrite"),
    ("benchmark on unknown dataset", _cli("benchmark_entry", ["-d", "Dataset077_None"]),
     r"Dataset077_None/dataset.json does not exist"),
    ("library: synthesize with 0 steps", _synthesize_call(steps=0), r"--steps 0: a sampler needs at least 1 step"),
    ("library: synthesize with negative guidance", _synthesize_call(labels="generated", guidance=-1.0),
     r"--guidance -1.0: the guidance weight must be >= 0"),
    ("nnU-Net folders not set", _cli("make_example_entry", [], env={"nnUNet_raw": None}), r"nnUNet_raw is not set"),
    # faults while writing
    ("no space left on device", _enospc, r"No space left on device while writing .*out.json; nothing was changed"),
]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and p.name != ".diffaug.lock"}


@pytest.mark.parametrize("name, build, message", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, name, build, message):
    call = build(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(DiffAugError, match=f"(?s){message}"):
        call()
    assert _snapshot(tmp_path) == before


def test_the_table_is_large_enough():
    assert len(BAD_INPUTS) >= 40


def test_console_scripts_print_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        cli.small_plans_entry(["-d", "456"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR: Unknown dataset '456'") and "Traceback" not in err


# Out-of-range numbers are refused while parsing: argparse names the flag, exits with status 2, and no work starts.
OUT_OF_RANGE_FLAGS = [
    ("synthesize_entry", ["-d", "10", "-f", "0", "-n", "2", "--steps", "0"], "--steps", "must be >= 1, got 0"),
    ("synthesize_entry", ["-d", "10", "-f", "0", "-n", "2", "--steps", "-3"], "--steps", "must be >= 1, got -3"),
    ("synthesize_entry", ["-d", "10", "-f", "0", "-n", "0"], "-n", "must be >= 1, got 0"),
    ("synthesize_entry", ["-d", "10", "-f", "0", "-n", "2", "--guidance", "-0.5"], "--guidance", "must lie in [0"),
    ("synthesize_entry", ["-d", "10", "-f", "0", "-n", "2", "--guidance", "nan"], "--guidance", "must lie in [0"),
    ("synthesize_entry", ["-d", "10", "-f", "-1", "-n", "2"], "-f", "must be >= 0, got -1"),
    ("synthesize_entry", ["-d", "10", "-f", "0", "-n", "2", "--seed", "-1"], "--seed", "must be >= 0"),
    ("synthesize_entry", ["-d", "10", "-f", "0", "-n", "2", "-num_parts", "0"], "-num_parts", "must be >= 1"),
    ("synthesize_entry", ["-d", "10", "-f", "0", "-n", "2", "--spacing", "1", "0", "1"], "--spacing", "must lie in (0"),
    ("synthesize_entry", ["-d", "10", "-f", "0", "-n", "2", "--min-component-voxels", "-1"],
     "--min-component-voxels", "must be >= 0"),
    ("train_synthesizer_entry", ["-d", "10", "-f", "0", "--seed", "x"], "--seed", "expected an integer, got 'x'"),
    ("benchmark_entry", ["-d", "10", "--ratios", "0"], "--ratios", "must lie in (0"),
    ("benchmark_entry", ["-d", "10", "--epochs", "0"], "--epochs", "must be >= 1"),
    ("benchmark_entry", ["-d", "10", "--test-fraction", "1"], "--test-fraction", "must lie in (0"),
    ("benchmark_entry", ["-d", "10", "--steps", "0"], "--steps", "must be >= 1"),
    ("demo_entry", ["--iterations", "0"], "--iterations", "must be >= 1"),
    ("evaluate_entry", ["-d", "10", "-f", "0", "--max-tiles", "0"], "--max-tiles", "must be >= 1"),
    ("evaluate_entry", ["-d", "10", "-f", "0", "--memorisation-percentile", "0"], "--memorisation-percentile",
     "must lie in (0"),
    ("small_plans_entry", ["-d", "10", "--batch-size", "0"], "--batch-size", "must be >= 1"),
]


@pytest.mark.parametrize("entry, argv, flag, message", OUT_OF_RANGE_FLAGS,
                         ids=[f"{e}:{' '.join(a[-2:])}" for e, a, _, _ in OUT_OF_RANGE_FLAGS])
def test_out_of_range_numbers_are_refused_before_any_work(tmp_path, capsys, monkeypatch, entry, argv, flag, message):
    for d in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(d, str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        getattr(cli, entry)(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and message in err, err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_p_is_the_plans_identifier_and_the_old_preset_spelling_still_works(capsys):
    from argparse import Namespace
    pick = cli._preset_and_plans
    assert pick(Namespace(preset=None, p=None, plans=None)) == ("default", "nnUNetPlans")
    assert pick(Namespace(preset="tiny", p="nnUNetPlansSmall", plans=None)) == ("tiny", "nnUNetPlansSmall")
    # older spellings: -p PRESET and -plans PLANS
    assert pick(Namespace(preset=None, p="tiny", plans="nnUNetPlansSmall")) == ("tiny", "nnUNetPlansSmall")
    capsys.readouterr()
    assert pick(Namespace(preset=None, p="my.json", plans=None)) == ("my.json", "nnUNetPlans")
    assert "'-p my.json' as the synthesizer preset is deprecated" in capsys.readouterr().err
    with pytest.raises(DiffAugError, match="-p nnUNetPlansA and -plans nnUNetPlansB disagree"):
        pick(Namespace(preset=None, p="nnUNetPlansA", plans="nnUNetPlansB"))
    with pytest.raises(DiffAugError, match="looks like a synthesizer preset, and --preset default is given too"):
        pick(Namespace(preset="default", p="tiny", plans=None))


def test_trainer_path_prints_an_export_line_that_keeps_the_users_folders(capsys, monkeypatch):
    from nnunet_diffaug.paths import trainer_shim_folder
    monkeypatch.setenv("nnUNet_extTrainer", "/my/trainers")
    cli.trainer_path_entry([])
    assert capsys.readouterr().out.strip() == f"export nnUNet_extTrainer='/my/trainers:{trainer_shim_folder()}'"
    cli.trainer_path_entry([])  # already there: not added twice
    assert capsys.readouterr().out.count(str(trainer_shim_folder())) == 1
