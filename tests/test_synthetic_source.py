"""Linking a synthetic set to a fold, and every refusal the trainer makes before training starts."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.provenance import CASE_RECORDS_DIR, PROVENANCE_FILE, SyntheticProvenance
from nnunet_diffaug.raw_dataset import label_file
from nnunet_diffaug.synthetic_writer import SyntheticDatasetWriter
from nnunet_diffaug.trainers.synthetic_source import locate_synthetic_dataset, validate_synthetic_dataset

REAL = "Dataset010_Toy"
REAL_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
             "file_ending": ".nii.gz"}
TRAIN, VAL = ["toy_000", "toy_001"], ["toy_002", "toy_003"]


def _image(value=0.0):
    img = sitk.GetImageFromArray(np.full((4, 6, 6), value, dtype=np.float32))
    img.SetSpacing((1.0, 1.0, 2.0))
    return img


def _label():
    arr = np.zeros((4, 6, 6), dtype=np.uint8)
    arr[1:3, 2:4, 2:4] = 1
    return sitk.GetImageFromArray(arr)


def _synthetic(raw, dataset_id=901, fold=0, training_cases=TRAIN, configuration="3d_fullres", n=2,
               real_json=REAL_JSON, source=REAL):
    prov = SyntheticProvenance(source_dataset=source, fold=fold, configuration=configuration,
                               training_cases=list(training_cases), generator={"kind": "test"}, seed=0)
    folder = raw / f"Dataset{dataset_id:03d}_ToySynthF{fold}"
    writer = SyntheticDatasetWriter(folder, real_json, prov)
    for i in range(n):
        writer.write_case(f"synth_{i:05d}", [_image(i)], _label(), {"label_source": training_cases[0]})
    writer.finalize()
    return folder


@pytest.fixture
def raw(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name.split("_")[1]))
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.delenv("DIFFAUG_SYNTHETIC_DATASET", raising=False)
    return raw


def _validate(folder, fold=0, configuration="3d_fullres", is_3d=True, real_json=REAL_JSON):
    return validate_synthetic_dataset(folder, real_json, REAL, fold, configuration, VAL, is_3d=is_3d)


def test_finds_the_set_made_for_the_fold_without_flags(raw):
    made = _synthetic(raw, 901, fold=0)
    _synthetic(raw, 902, fold=1, training_cases=VAL)
    assert locate_synthetic_dataset(REAL, 0, "3d_fullres") == made
    assert _validate(made) == ["synth_00000", "synth_00001"]
    written = json.loads((made / "dataset.json").read_text())
    assert written["numTraining"] == 2 and written["labels"] == REAL_JSON["labels"]


def test_no_set_refused_with_what_to_run(raw):
    _synthetic(raw, 902, fold=1, training_cases=VAL)
    with pytest.raises(DiffAugError, match=r"(?s)No synthetic dataset for Dataset010_Toy fold 0.*diffaug_train_synthesizer -d Dataset010_Toy -f 0"):
        locate_synthetic_dataset(REAL, 0, "3d_fullres")


def test_several_sets_refused_unless_one_is_chosen(raw, monkeypatch):
    _synthetic(raw, 901)
    second = _synthetic(raw, 903)
    with pytest.raises(DiffAugError, match="DIFFAUG_SYNTHETIC_DATASET"):
        locate_synthetic_dataset(REAL, 0, "3d_fullres")
    monkeypatch.setenv("DIFFAUG_SYNTHETIC_DATASET", str(second))
    assert locate_synthetic_dataset(REAL, 0, "3d_fullres") == second


def test_validation_leak_refused(raw):
    folder = _synthetic(raw, training_cases=TRAIN + ["toy_003"])
    with pytest.raises(DiffAugError, match=r"saw 1 validation case\(s\) of fold 0 \(toy_003\)"):
        _validate(folder)


def test_set_for_another_fold_refused(raw, monkeypatch):
    folder = _synthetic(raw, fold=1, training_cases=VAL)
    with pytest.raises(DiffAugError, match="made for fold 1"):
        _validate(folder, fold=0)


@pytest.mark.parametrize("change, message", [
    ({"channel_names": {"0": "MR"}}, "channel_names"),
    ({"channel_names": {"0": "CT", "1": "PET"}}, "channel_names"),
    ({"labels": {"background": 0, "organ": 1, "tumour": 2}}, "labels"),
    ({"file_ending": ".nrrd"}, "file_ending"),
])
def test_mismatching_set_refused(raw, change, message):
    folder = _synthetic(raw)
    dj = json.loads((folder / "dataset.json").read_text())
    dj.update(change)
    (folder / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(DiffAugError, match=message):
        _validate(folder)


def test_2d_synthesizer_refused_for_3d_training(raw):
    folder = _synthetic(raw, configuration="2d")
    with pytest.raises(DiffAugError, match="2d synthesizer"):
        _validate(folder, is_3d=True)
    assert _validate(folder, configuration="2d", is_3d=False)


def test_incomplete_cases_are_never_used_and_an_empty_set_is_refused(raw):
    folder = _synthetic(raw, n=2)
    label_file(folder, "synth_00001", ".nii.gz").unlink()  # as if killed before the label was written
    assert _validate(folder) == ["synth_00000"]
    label_file(folder, "synth_00000", ".nii.gz").unlink()
    with pytest.raises(DiffAugError, match="no complete synthetic case"):
        _validate(folder)


def test_set_without_provenance_refused(raw, monkeypatch):
    folder = _synthetic(raw)
    (folder / PROVENANCE_FILE).unlink()
    monkeypatch.setenv("DIFFAUG_SYNTHETIC_DATASET", str(folder))
    with pytest.raises(DiffAugError, match="diffaug_provenance.json does not exist"):
        _validate(locate_synthetic_dataset(REAL, 0, "3d_fullres"))


def test_set_from_another_dataset_refused(raw):
    folder = _synthetic(raw, source="Dataset011_Other")
    with pytest.raises(DiffAugError, match="made from Dataset011_Other"):
        _validate(folder)


def test_writer_refuses_to_mix_different_provenance_into_one_folder(raw):
    folder = _synthetic(raw)
    other = SyntheticProvenance(source_dataset=REAL, fold=0, configuration="3d_fullres", training_cases=TRAIN,
                                generator={"kind": "another model"}, seed=1)
    with pytest.raises(DiffAugError, match="different provenance"):
        SyntheticDatasetWriter(folder, REAL_JSON, other)
    assert len(list((folder / CASE_RECORDS_DIR).iterdir())) == 2  # nothing lost
