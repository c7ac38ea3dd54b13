"""``diffaug_make_example --labels``: the example with only some classes labelled (sparse labels, as most real
datasets have). The kept classes' voxels are exactly the dense build's, renumbered 1..k in the given order;
every other voxel is background; the images are the dense build's; dataset.json declares only the kept labels."""
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffaug import cli
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.example_data import EXAMPLE_LABELS, FOREGROUND_NAMES, build_example_dataset

SMALL = ["--slab-slices", "8", "--in-plane-size", "32"]   # 4 cases of 32 x 32 x 8: fast
SMALL_KW = dict(slab_slices=8, in_plane_size=32)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return build_example_dataset(tmp_path_factory.mktemp("dense"), 990, **SMALL_KW)


@pytest.fixture
def raw(tmp_path, monkeypatch):
    for name in ("raw", "preprocessed", "results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    return tmp_path / "raw"


def _make_example(argv, capsys):
    cli.make_example_entry(argv)
    out = capsys.readouterr().out.strip().splitlines()
    return out[-1]


def _read(path):
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def _cases(folder):
    return sorted(p.name[:-len(".nii.gz")] for p in (folder / "labelsTr").glob("*.nii.gz"))


@pytest.mark.parametrize("names, task_name", [
    (["spine", "ribs"], "ChestCTSlabsSpineRibs"),
    (["left_lung"], "ChestCTSlabsLeftLung"),
    (["soft_tissue", "right_lung", "ribs"], "ChestCTSlabsSoftTissueRightLungRibs"),
])
def test_only_the_named_classes_stay_labelled_renumbered_in_the_given_order(dense, raw, capsys, names, task_name):
    printed = _make_example(["-d", "993", *SMALL, "--labels", *names], capsys)
    sparse = raw / f"Dataset993_{task_name}"
    assert printed == str(sparse)

    dataset_json = json.loads((sparse / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, **{n: i for i, n in enumerate(names, start=1)}}
    assert dataset_json["name"] == sparse.name
    assert dataset_json["numTraining"] == json.loads((dense / "dataset.json").read_text())["numTraining"]

    assert _cases(sparse) == _cases(dense)
    assert sorted(p.name for p in (sparse / "imagesTr").iterdir()) == sorted(p.name for p in (dense / "imagesTr").iterdir())
    kept_dense_values = [EXAMPLE_LABELS[n] for n in names]
    labelled_sparse = labelled_dense = 0
    for case in _cases(dense):
        dense_label, d = _read(dense / "labelsTr" / f"{case}.nii.gz")
        sparse_label, s = _read(sparse / "labelsTr" / f"{case}.nii.gz")
        for new_value, name in enumerate(names, start=1):
            np.testing.assert_array_equal(s == new_value, d == EXAMPLE_LABELS[name], err_msg=f"{case}: {name}")
        # every voxel of a dropped class, and all background, is background
        assert not s[~np.isin(d, kept_dense_values)].any(), case
        assert set(np.unique(s)) <= set(range(len(names) + 1))
        for attribute in ("GetOrigin", "GetSpacing", "GetDirection", "GetSize"):
            assert getattr(sparse_label, attribute)() == getattr(dense_label, attribute)()
        # the image is the dense build's, voxel for voxel and in the same place
        dense_image, di = _read(dense / "imagesTr" / f"{case}_0000.nii.gz")
        sparse_image, si = _read(sparse / "imagesTr" / f"{case}_0000.nii.gz")
        np.testing.assert_array_equal(si, di)
        assert sparse_image.GetPixelID() == dense_image.GetPixelID()
        for attribute in ("GetOrigin", "GetSpacing", "GetDirection"):
            assert getattr(sparse_image, attribute)() == getattr(dense_image, attribute)()
        labelled_sparse += int((s > 0).sum())
        labelled_dense += int((d > 0).sum())
    # sparse for real: a minority of what the dense example labels, and not nothing
    assert 0 < labelled_sparse < labelled_dense


def test_without_labels_it_is_the_dense_example(dense, raw, capsys):
    printed = _make_example(["-d", "990", *SMALL], capsys)
    assert printed == str(raw / "Dataset990_ChestCTSlabs")
    assert json.loads((raw / "Dataset990_ChestCTSlabs" / "dataset.json").read_text())["labels"] == EXAMPLE_LABELS
    # naming every class in its own order is the dense example too, under the dense name
    every = build_example_dataset(raw, 991, labels=list(FOREGROUND_NAMES), **SMALL_KW)
    assert every.name == "Dataset991_ChestCTSlabs"
    for case in _cases(dense):
        assert (every / "labelsTr" / f"{case}.nii.gz").read_bytes() == (dense / "labelsTr" / f"{case}.nii.gz").read_bytes()


@pytest.mark.parametrize("names, message", [
    (["spine", "lungs"], r"--labels spine lungs: 'lungs' is not a label of the example dataset"),
    (["background"], r"'background' is always kept"),
    (["ribs", "ribs"], r"--labels ribs ribs: ribs given twice"),
])
def test_a_bad_name_is_refused_naming_the_option_and_the_valid_names(raw, capsys, names, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.make_example_entry(["-d", "993", *SMALL, "--labels", *names])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR: ") and "Traceback" not in err
    assert re.search(message, err), err
    if "twice" not in message:
        assert "valid names: " + ", ".join(FOREGROUND_NAMES) in err
    assert list(raw.iterdir()) == []   # nothing written
    with pytest.raises(DiffAugError, match=message):
        build_example_dataset(raw, 993, labels=names, **SMALL_KW)


def test_a_second_dataset_under_one_id_is_refused(raw, capsys):
    # dense and sparse get different folder names; one id for both would leave nnU-Net unable to pick one
    _make_example(["-d", "993", *SMALL], capsys)
    with pytest.raises(SystemExit):
        cli.make_example_entry(["-d", "993", *SMALL, "--labels", "spine", "ribs"])
    err = capsys.readouterr().err
    assert "Dataset993_ChestCTSlabs already uses dataset id 993" in err and "another -d" in err
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset993_ChestCTSlabs"]
    # --overwrite keeps its meaning (rewrite this dataset), so it does not replace the other one either
    with pytest.raises(SystemExit):
        cli.make_example_entry(["-d", "993", *SMALL, "--labels", "spine", "ribs", "--overwrite"])
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset993_ChestCTSlabs"]
