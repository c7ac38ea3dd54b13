"""Synthesizers that learn from more than the fold's labelled cases: unlabelled images (``--unlabeled``) and
another synthesizer's weights (``--init-from``), on the planned chest CT example (2d, micro budgets).

Fold 0 of the example trains on chest_001/003/005/007 and validates on chest_000/002/004/006.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from support import EXAMPLE_NAME, RecordingRunner, nnunet_folders, private_copy_of_example, toy_benchmark_dataset

from nnunet_diffaug import cli
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.paths import synthesizer_folder
from nnunet_diffaug.provenance import read_provenance
from nnunet_diffaug.synthesis.config import SynthesizerConfig
from nnunet_diffaug.synthesis.synthesize import synthesize
from nnunet_diffaug.synthesis.synthesizer import Synthesizer
from nnunet_diffaug.synthesis.training import train_synthesizer
from nnunet_diffaug.unlabeled import preprocessed_folder

MICRO = {"base": "tiny", "autoencoder": {"steps": 4}, "diffusion": {"steps": 4, "scale_factor_batches": 1},
         "checkpoint_every": 4, "montage_cases": 1}
SOURCE = {"base": "tiny", "autoencoder": {"steps": 40}, "diffusion": {"steps": 40, "scale_factor_batches": 1},
          "checkpoint_every": 40, "montage_cases": 1}


def _config(obj: dict) -> SynthesizerConfig:
    return SynthesizerConfig.from_json(json.loads(json.dumps(obj)))


def _train(config: dict, **kwargs) -> Path:
    return train_synthesizer(EXAMPLE_NAME, "2d", 0, _config(config), device="cpu", seed=0, progress=False,
                             overwrite=True, **kwargs)


def _raw_image(root: Path, case: str) -> Path:
    return root / "raw" / EXAMPLE_NAME / "imagesTr" / f"{case}_0000.nii.gz"


def _write_like(reference: Path, array: np.ndarray, path: Path) -> None:
    ref = sitk.ReadImage(str(reference))
    img = sitk.GetImageFromArray(array.astype(np.float32))
    img.CopyInformation(ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


@pytest.fixture(scope="module")
def example(planned_example, tmp_path_factory):
    root = private_copy_of_example(planned_example[0], tmp_path_factory.mktemp("unlabelled"))
    pool = root / "pool"  # two unlabelled images made from training cases: mirrored, with other noise
    rng = np.random.default_rng(0)
    for name, case in (("pool_a", "chest_001"), ("pool_b", "chest_003")):
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(_raw_image(root, case))))
        _write_like(_raw_image(root, case), arr[:, :, ::-1] + rng.normal(0, 5, arr.shape), pool / f"{name}_0000.nii.gz")
    with nnunet_folders(root):
        yield root, pool


@pytest.fixture(scope="module")
def plain(example):
    """Fold 0's micro synthesizer without outside data, copied aside (later runs overwrite the fold's folder)."""
    root, _ = example
    folder = _train(MICRO)
    synthesize(EXAMPLE_NAME, "2d", 0, 1, sampler="ddim", steps=2, device="cpu", progress=False)
    copy = root / "plain_synthesizer"
    shutil.copytree(folder, copy)
    return copy


# ---------------------------------------------------------------------------------------------- refusals

def _bad_source(root: Path, kind: str) -> tuple[Path, str]:
    folder = root / f"bad_{kind}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    if kind == "validation":  # chest_002 is a validation case of fold 0: renamed and re-compressed
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(_raw_image(root, "chest_002"))))
        _write_like(_raw_image(root, "chest_002"), arr, folder / "renamed_0000.nii.gz")
        return folder, r"renamed_0000\.nii\.gz is validation case chest_002 of fold 0"
    if kind == "ending":
        shutil.copy(_raw_image(root, "chest_001"), folder / "other_0000.nrrd")
        return folder, r"other_0000\.nrrd does not end in '\.nii\.gz'"
    if kind == "channels":
        shutil.copy(_raw_image(root, "chest_001"), folder / "two_0000.nii.gz")
        shutil.copy(_raw_image(root, "chest_001"), folder / "two_0001.nii.gz")
        return folder, r"case two of .* has channel\(s\) \[0, 1\].*the dataset has 1"
    if kind == "unreadable":
        (folder / "broken_0000.nii.gz").write_bytes(b"not an image at all")
        return folder, r"broken_0000\.nii\.gz cannot be read as an image"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["validation", "ending", "channels", "unreadable"])
def test_bad_unlabelled_sources_are_refused_naming_the_file(example, kind):
    root, pool = example
    source, message = _bad_source(root, kind)
    folder = synthesizer_folder(EXAMPLE_NAME, "2d", 0)
    before = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    with pytest.raises(DiffAugError, match=message):
        _train(MICRO, unlabeled=[str(pool), str(source)])
    after = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    assert after == before  # refused before anything was written


def test_the_cli_refuses_with_one_line(example, capsys):
    root, _ = example
    source, _ = _bad_source(root, "validation")
    with pytest.raises(SystemExit) as e:
        cli.train_synthesizer_entry(["-d", EXAMPLE_NAME, "-f", "0", "-c", "2d", "--preset", "tiny", "-device", "cpu",
                                     "--unlabeled", str(source)])
    assert e.value.code == 2
    assert "is validation case chest_002 of fold 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- training with them

@pytest.fixture(scope="module")
def with_unlabeled(example, plain):
    root, pool = example
    folder = _train(MICRO, unlabeled=[str(pool)])
    synthesize(EXAMPLE_NAME, "2d", 0, 1, sampler="ddim", steps=2, device="cpu", progress=False)
    copy = root / "unlabeled_synthesizer"
    shutil.copytree(folder, copy)
    return copy


def test_unlabelled_images_are_preprocessed_once_recorded_and_trained_on(example, with_unlabeled):
    root, pool = example
    folder = with_unlabeled
    log = (folder / "training_log.txt").read_text()
    assert "unlabeled: 2 image(s), 0 preprocessed earlier, 2 to preprocess" in log
    assert "autoencoder: 2 unlabelled image(s) beside 4 labelled case(s)" in log
    assert "diffusion: 50% of each batch from 2 unlabelled image(s)" in log
    cache = preprocessed_folder(EXAMPLE_NAME, "nnUNetPlans", "2d")
    npys = sorted(cache.glob("*.b2nd"))
    assert len(npys) == 2 and cache.parent.parent.name == EXAMPLE_NAME
    real = root / "preprocessed" / EXAMPLE_NAME / "nnUNetPlans_2d"  # never mixed into the real preprocessed data
    assert not {p.name for p in npys} & {p.name for p in real.iterdir()} and real not in cache.parents
    record = json.loads((folder / "unlabeled_images.json").read_text())
    assert sorted(Path(f["path"]).name for im in record["images"] for f in im["files"]) == [
        "pool_a_0000.nii.gz", "pool_b_0000.nii.gz"]
    assert all(len(f["sha256"]) == 64 for im in record["images"] for f in im["files"])
    run = json.loads((folder / "synthesizer.json").read_text())
    assert run["unlabeled"]["sha256"] == record["sha256"] and run["unlabeled"]["images"] == 2
    assert json.loads((folder / "config.json").read_text())["diffusion"]["null_label"] is True
    from nnunet_diffaug.synthesis.checkpoint import read_state
    for stage in ("autoencoder", "diffusion"):  # the weight files name the sources too
        assert read_state(folder / f"{stage}.safetensors")["unlabeled"] == run["unlabeled"]

    # a rerun (here: starting over) reuses the cache: nothing is preprocessed again
    mtimes = [p.stat().st_mtime_ns for p in npys]
    again = _train(MICRO, unlabeled=[str(pool)])
    assert "unlabeled: 2 image(s), 2 preprocessed earlier, 0 to preprocess" in (again / "training_log.txt").read_text()
    assert [p.stat().st_mtime_ns for p in npys] == mtimes
    with pytest.raises(DiffAugError, match=r"was started with --unlabeled .*Pass the same --unlabeled to continue"):
        train_synthesizer(EXAMPLE_NAME, "2d", 0, _config(MICRO), device="cpu", seed=0, progress=False)


def test_unlabelled_images_train_a_3d_synthesizer_too(example, with_unlabeled):
    root, pool = example
    folder = train_synthesizer(EXAMPLE_NAME, "3d_fullres", 0, _config(MICRO), device="cpu", seed=0, progress=False,
                               overwrite=True, unlabeled=[str(pool)])
    log = (folder / "training_log.txt").read_text()
    assert "autoencoder: 2 unlabelled image(s) beside 4 labelled case(s), 33% of the samples unlabelled" in log
    assert (folder / "diffusion.safetensors").is_file()
    assert len(list(preprocessed_folder(EXAMPLE_NAME, "nnUNetPlans", "3d_fullres").glob("*.b2nd"))) == 2


def test_label_dropout_alone_trains_the_no_label_condition(example, with_unlabeled):
    folder = _train({**MICRO, "diffusion": {**MICRO["diffusion"], "label_dropout": 0.5}})
    assert json.loads((folder / "config.json").read_text())["diffusion"]["null_label"] is True
    assert Synthesizer.load(folder, torch.device("cpu")).sampling_model(2.0) is not None  # guidance is available


def _listing(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None


@pytest.mark.parametrize("section, key, value", [("diffusion", "null_label", True),
                                                 ("sampling", "label_guidance", 2.0),
                                                 ("sampling", "label_guidance", 0.0)])
def test_a_no_label_condition_that_nothing_trains_is_refused_before_anything_is_written(example, section, key,
                                                                                        value):
    folder = synthesizer_folder(EXAMPLE_NAME, "2d", 0)
    before = _listing(folder)
    config = {**MICRO, section: {**MICRO.get(section, {}), key: value}}
    with pytest.raises(DiffAugError, match=r"nothing trains the 'no label' condition.*--unlabeled SOURCE.*"
                                           r'"label_dropout": 0\.1'):
        _train(config)
    assert _listing(folder) == before  # not even the folder when it was not there


def test_a_set_made_with_unlabelled_images_has_another_provenance(example, plain, with_unlabeled):
    root, _ = example
    sets = sorted((root / "raw").glob("Dataset*_*SynthF0"))
    assert len(sets) == 2, sets  # the second request did not continue the first set
    provenances = [read_provenance(s).generator for s in sets]
    without = [g for g in provenances if "unlabeled" not in g]
    with_ = [g for g in provenances if "unlabeled" in g]
    assert len(without) == 1 and len(with_) == 1
    run = json.loads((with_unlabeled / "synthesizer.json").read_text())
    assert with_[0]["unlabeled"] == run["unlabeled"]


def _sets(root: Path, outside: bool) -> list[Path]:
    """Fold 0's unguided sets made with (``outside``) or without unlabelled images."""
    return [s for s in sorted((root / "raw").glob("Dataset*_*SynthF0"))
            if ("unlabeled" in read_provenance(s).generator) == outside
            and "label_guidance" not in read_provenance(s).generator]


def _check_set(root: Path, folder: Path, validation: list[str]):
    """The trainer's check of a synthetic set (nnUNetTrainerDiffAug passes its plans)."""
    from nnunet_diffaug.trainers.synthetic_source import validate_synthetic_dataset
    real_json = json.loads((root / "raw" / EXAMPLE_NAME / "dataset.json").read_text())
    plans = json.loads((root / "preprocessed" / EXAMPLE_NAME / "nnUNetPlans.json").read_text())
    return validate_synthetic_dataset(folder, real_json, EXAMPLE_NAME, 0, "2d", validation, is_3d=False, plans=plans)


def test_a_set_made_with_unlabelled_images_is_checked_against_the_split_as_it_is_now(example, plain,
                                                                                    with_unlabeled):
    """The set carries what its synthesizer saw; after the split changes so that one unlabelled image is now a
    validation case (added to the dataset and to fold 0's validation cases), the trainer refuses the set."""
    from nnunet_diffaug.raw_dataset import read_fold
    root, pool = example
    folder = _sets(root, outside=True)[0]
    seen = json.loads((folder / "diffaug_seen_data.json").read_text())
    assert seen == json.loads((with_unlabeled / "seen_data.json").read_text())
    assert len(seen["unlabeled_content_sha256"]) == 2
    assert _check_set(root, folder, read_fold(root / "preprocessed" / EXAMPLE_NAME, 0)[1])  # the split it was made on

    raw, splits_file = root / "raw" / EXAMPLE_NAME, root / "preprocessed" / EXAMPLE_NAME / "splits_final.json"
    added = [raw / "imagesTr" / "chest_new_0000.nii.gz", raw / "labelsTr" / "chest_new.nii.gz"]
    splits = splits_file.read_text()
    shutil.copy(pool / "pool_a_0000.nii.gz", added[0])  # mirrored chest_001: its label's grid fits
    shutil.copy(raw / "labelsTr" / "chest_001.nii.gz", added[1])
    changed = json.loads(splits)
    changed[0]["val"].append("chest_new")
    splits_file.write_text(json.dumps(changed))
    try:
        with pytest.raises(DiffAugError) as e:
            _check_set(root, folder, read_fold(root / "preprocessed" / EXAMPLE_NAME, 0)[1])
        text = str(e.value)
        assert text.startswith(f"{folder / 'diffaug_seen_data.json'}: the synthesizer that made this set has seen "
                               f"validation case(s) ['chest_new'] of fold 0 of {EXAMPLE_NAME} among its unlabelled "
                               f"images"), text
        assert "Retrain the synthesizer on this fold's split" in text and "synthesize again" in text
    finally:
        splits_file.write_text(splits)
        for f in added:
            f.unlink()


def test_a_set_without_outside_data_has_no_seen_data_and_its_check_reads_no_raw_image(example, plain,
                                                                                      with_unlabeled, tmp_path,
                                                                                      capsys):
    """Its check compares names only: it passes with the validation cases' raw images gone (the set made with
    unlabelled images then needs them); a set made with them before the file existed gets a note."""
    root, _ = example
    folder = _sets(root, outside=False)[0]
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "dataset.json", "diffaug_cases", "diffaug_montage.png", "diffaug_provenance.json", "imagesTr", "labelsTr"]
    validation = ["chest_000", "chest_002", "chest_004", "chest_006"]
    images = [_raw_image(root, c) for c in validation]
    for f in images:
        f.rename(f.with_name(f"aside_{f.name}"))
    try:
        assert _check_set(root, folder, validation)
        with pytest.raises(DiffAugError, match=r"lacks the raw images of validation case\(s\)"):
            _check_set(root, _sets(root, outside=True)[0], validation)
    finally:
        for f in images:
            f.with_name(f"aside_{f.name}").rename(f)
    older = tmp_path / "older_unlabelled_set"  # as made before sets carried the file
    shutil.copytree(_sets(root, outside=True)[0], older)
    (older / "diffaug_seen_data.json").unlink()
    capsys.readouterr()
    assert _check_set(root, older, validation)
    out = capsys.readouterr().out
    assert f"NOTE: {older}: its synthesizer's unlabelled images could not be re-checked against fold 0's current " \
           f"validation cases" in out and out.count("NOTE") == 1


def test_label_guidance_needs_the_no_label_condition(example, plain, with_unlabeled):
    labels = np.zeros((1, 64, 64), dtype=np.int64)
    labels[0, 20:40, 20:40] = 1
    syn = Synthesizer.load(with_unlabeled, torch.device("cpu"))
    smp = syn.sampler("ddim", 2)
    plain_images = syn.generate(labels, smp, torch.Generator().manual_seed(0))
    guided = syn.generate(labels, smp, torch.Generator().manual_seed(0), guidance=3.0)
    assert guided.shape == plain_images.shape and not np.allclose(guided, plain_images)
    old = Synthesizer.load(plain, torch.device("cpu"))
    assert not old.config.diffusion.null_label
    stored = json.loads((plain / "config.json").read_text())  # a config written before these keys existed
    for section, key in (("diffusion", "null_label"), ("diffusion", "unlabeled_share"),
                         ("diffusion", "label_dropout"), ("sampling", "label_guidance")):
        del stored[section][key]
    older = SynthesizerConfig.from_json(stored)
    assert not older.diffusion.null_label and older.sampling.label_guidance == 1.0
    assert old.sampling_model() is old.model  # plain conditional sampling, the model itself
    with pytest.raises(DiffAugError, match="trained without the 'no label' condition"):
        old.generate(labels, old.sampler("ddim", 2), torch.Generator().manual_seed(0), guidance=2.0)



def _make_fold_synthesizer(copy: Path) -> None:
    folder = synthesizer_folder(EXAMPLE_NAME, "2d", 0)
    shutil.rmtree(folder)
    shutil.copytree(copy, folder)


def test_synthesize_takes_a_label_guidance_weight_and_records_it(example, plain, with_unlabeled, tmp_path):
    before = shutil.copytree(synthesizer_folder(EXAMPLE_NAME, "2d", 0), tmp_path / "before")
    _make_fold_synthesizer(with_unlabeled)
    guided = synthesize(EXAMPLE_NAME, "2d", 0, 1, sampler="ddim", steps=2, device="cpu", progress=False,
                        label_guidance=2.5)
    assert read_provenance(guided).generator["label_guidance"] == 2.5  # another set than the unguided one
    unguided = synthesize(EXAMPLE_NAME, "2d", 0, 1, sampler="ddim", steps=2, device="cpu", progress=False)
    assert unguided != guided and "label_guidance" not in read_provenance(unguided).generator
    _make_fold_synthesizer(plain)
    with pytest.raises(DiffAugError, match=r"--label-guidance 2: .*trained without the 'no label' condition"):
        synthesize(EXAMPLE_NAME, "2d", 0, 1, sampler="ddim", steps=2, device="cpu", progress=False,
                   label_guidance=2.0)
    with pytest.raises(DiffAugError, match=r"--label-guidance do\(es\) not apply to --generator randomised"):
        synthesize(EXAMPLE_NAME, "2d", 0, 1, generator="randomised", progress=False, label_guidance=2.0)
    _make_fold_synthesizer(before)  # as it was, for the tests below


def _null_config(**diffusion) -> SynthesizerConfig:
    return _config({**MICRO, "diffusion": {**MICRO["diffusion"], **diffusion}})


def test_label_guidance_is_refused_where_the_no_label_input_is_missing_or_untrained(tmp_path):
    """The decision alone, on run files: images, dropout or a loaded init source train the input; a source of
    another label set, or one whose condition-map tensors were not loaded (another layout), does not."""
    from nnunet_diffaug.synthesis.outside_data import guidance_refusal

    def refusal(config, run, not_loaded=None, guidance=2.0):
        folder = tmp_path / f"syn{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "synthesizer.json").write_text(json.dumps(run))
        if not_loaded is not None:
            (folder / "init_from_diffusion.json").write_text(json.dumps(
                {"loaded": [], "not_loaded": [{"tensor": t, "why": "shape"} for t in not_loaded]}))
        return guidance_refusal(folder, config, guidance)
    same, other = {"init_from": {"same_labels": True}}, {"init_from": {"same_labels": False}}
    assert refusal(_null_config(), {}, guidance=1.0) is None  # plain conditional sampling needs nothing
    assert "trained without the 'no label' condition" in refusal(_null_config(), {})
    assert refusal(_null_config(null_label=True), {"unlabeled": {"images": 2}}) is None
    assert refusal(_null_config(null_label=True, label_dropout=0.1), {}) is None
    assert refusal(_null_config(null_label=True), same) is None
    assert refusal(_null_config(null_label=True), same, ["model.down_blocks.0.norm.weight"]) is None
    for run, not_loaded in ((other, None), (same, ["model.mid_block.resnets.0.norm1.mlp_shared.0.weight"]),
                            ({}, None)):
        why = refusal(_null_config(null_label=True), run, not_loaded)
        assert "has the 'no label' input, but never trained it" in why
        assert "Use label guidance 1" in why and "--unlabeled SOURCE" in why and "label_dropout" in why


def test_synthesize_refuses_guidance_from_an_untrained_no_label_input_before_writing(example, with_unlabeled,
                                                                                   tmp_path, capsys):
    """A synthesizer whose 'no label' channel was only carried for an init source of another label set (its
    input re-initialised, never trained): --label-guidance is refused by the command, naming the folder."""
    root, _ = example
    before = shutil.copytree(synthesizer_folder(EXAMPLE_NAME, "2d", 0), tmp_path / "before")

    def carried(run: dict, seen: dict) -> None:
        del run["unlabeled"]
        run["init_from"] = {"folder": "/elsewhere", "weights_sha256": "0" * 64, "dataset": "Dataset997_Other",
                            "fold": 0, "same_labels": False}
    _make_fold_synthesizer(_copy_of(with_unlabeled, "carried_null_channel", carried))
    sets = _listing(root / "raw")
    try:
        with pytest.raises(SystemExit) as e:
            cli.synthesize_entry(["-d", EXAMPLE_NAME, "-f", "0", "-c", "2d", "-n", "1", "-device", "cpu",
                                  "--label-guidance", "2"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"--label-guidance 2: the synthesizer in {synthesizer_folder(EXAMPLE_NAME, '2d', 0)}" in err
        assert "never trained it" in err and "Use label guidance 1" in err
        assert _listing(root / "raw") == sets  # nothing written
    finally:
        _make_fold_synthesizer(before)


def test_mixed_batches_hold_the_configured_share_on_the_null_condition(example, with_unlabeled):
    from nnunet_diffaug.synthesis.data import FoldData, PatchSampler
    from nnunet_diffaug.synthesis.unlabeled_data import MixedSampler, UnlabeledPatchSampler
    from nnunet_diffaug.unlabeled import PreprocessedImage
    syn = Synthesizer.load(with_unlabeled, torch.device("cpu"))
    data = FoldData(EXAMPLE_NAME, "2d", 0)
    cache = preprocessed_folder(EXAMPLE_NAME, "nnUNetPlans", "2d")
    images = [PreprocessedImage(json.loads(m.read_text())["content_sha256"], str(m.with_name(m.name.split(".")[0]
              + ".b2nd")), json.loads(m.read_text())["spacing"], json.loads(m.read_text())["shape"])
              for m in sorted(cache.glob("*.diffaug.json"))]
    patches = PatchSampler(data, syn.spec.patch_size, 0.5)
    sampler = MixedSampler(patches, UnlabeledPatchSampler(images, syn.spec.patch_size, 2), 0.25)
    rng = np.random.default_rng(0)
    shares = []
    for _ in range(40):
        b = sampler.mixed_batch(rng, 4)
        shares.append(float(b.unlabeled.float().mean()))
        cond = syn.condition(b.labels, b.images, unlabeled=b.unlabeled).spatial
        assert torch.all(cond[b.unlabeled][:, -1] == 1) and torch.all(cond[b.unlabeled][:, :-1] == 0)
        assert torch.all(cond[~b.unlabeled][:, -1] == 0)
        assert torch.allclose(cond[~b.unlabeled][:, :-1].sum(1), torch.ones(1))  # one-hot label maps
    assert abs(np.mean(shares) - 0.25) < 0.08


# ---------------------------------------------------------------------------------------------- --init-from

@pytest.fixture(scope="module")
def source(example, plain, with_unlabeled):
    """A synthesizer of fold 0 trained ten times longer than MICRO, copied aside."""
    root, _ = example
    folder = _train(SOURCE)
    copy = root / "source_synthesizer"
    shutil.copytree(folder, copy)
    return copy


def _losses(folder: Path, stage: str) -> dict:
    from nnunet_diffaug.synthesis.checkpoint import read_state
    return read_state(folder / f"{stage}.safetensors")["losses"]


def test_init_from_a_trained_synthesizer_starts_lower_and_logs_what_it_loaded(example, plain, source):
    scratch = {s: _losses(plain, s) for s in ("autoencoder", "diffusion")}
    folder = _train(MICRO, init_from=str(source))
    tuned = {s: _losses(folder, s) for s in ("autoencoder", "diffusion")}
    # same seed: the same batches, timesteps and noise; only the starting weights differ
    assert tuned["autoencoder"]["l1"][0] < 0.7 * scratch["autoencoder"]["l1"][0]
    assert np.mean(tuned["diffusion"]["mse"]) < np.mean(scratch["diffusion"]["mse"])
    log = (folder / "training_log.txt").read_text()
    assert f"init-from: {source}" in log and "label set same" in log
    for stage in ("autoencoder", "diffusion"):
        record = json.loads((folder / f"init_from_{stage}.json").read_text())
        assert record["loaded"] and record["not_loaded"] == []
        assert f"init-from {stage}: loaded {len(record['loaded'])} of {len(record['loaded'])} tensors" in log
    run = json.loads((folder / "synthesizer.json").read_text())
    assert run["init_from"]["folder"] == str(source) and len(run["init_from"]["weights_sha256"]) == 64


def test_init_from_another_label_set_reinitialises_the_label_inputs(example, source):
    root, _ = example
    other = root / "other_labels"
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(source, other)
    seen = json.loads((other / "seen_data.json").read_text())
    seen["labels"] = {"background": 0, **{f"renamed_{k}": v for k, v in seen["labels"].items() if k != "background"}}
    (other / "seen_data.json").write_text(json.dumps(seen))
    folder = _train({**MICRO, "diffusion": {**MICRO["diffusion"], "steps": 1}, "autoencoder": {"steps": 1},
                     "checkpoint_every": 1}, init_from=str(other))
    record = json.loads((folder / "init_from_diffusion.json").read_text())
    not_loaded = {r["tensor"]: r["why"] for r in record["not_loaded"]}
    assert not_loaded and all("mlp_shared" in n for n in not_loaded)
    assert set(not_loaded.values()) == {"reads the label map, and the label set differs"}
    assert json.loads((folder / "init_from_autoencoder.json").read_text())["not_loaded"] == []
    assert "label set differs" in (folder / "training_log.txt").read_text()


def test_init_from_a_synthesizer_of_an_older_version_reads_what_it_saw_from_its_spec(example, source):
    root, _ = example
    older = root / "older_source"
    shutil.rmtree(older, ignore_errors=True)
    shutil.copytree(source, older)
    (older / "seen_data.json").unlink()  # written since this version
    folder = _train({**MICRO, "diffusion": {**MICRO["diffusion"], "steps": 1}, "autoencoder": {"steps": 1},
                     "checkpoint_every": 1}, init_from=str(older))
    assert json.loads((folder / "init_from_diffusion.json").read_text())["not_loaded"] == []  # same dataset and labels
    seen = json.loads((folder / "seen_data.json").read_text())
    assert seen["labelled_cases"][EXAMPLE_NAME] == ["chest_001", "chest_003", "chest_005", "chest_007"]


GUIDED = {**MICRO, "sampling": {"label_guidance": 2.0}}


def _copy_of(source: Path, name: str, edit=None) -> Path:
    """A copy of a synthesizer folder with ``edit(run_file_dict, seen_dict)`` applied to its synthesizer.json and
    seen_data.json."""
    copy = source.parent / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(source, copy)
    if edit is not None:
        run, seen = (json.loads((copy / f).read_text()) for f in ("synthesizer.json", "seen_data.json"))
        edit(run, seen)
        (copy / "synthesizer.json").write_text(json.dumps(run))
        (copy / "seen_data.json").write_text(json.dumps(seen))
    return copy


def _other_labels(run: dict, seen: dict) -> None:
    seen["labels"] = {"background": 0, **{f"renamed_{k}": v for k, v in seen["labels"].items() if k != "background"}}


def test_the_no_label_condition_counts_as_trained_by_images_dropout_or_a_loaded_init_source(example, with_unlabeled):
    """Accepted (one step each): guidance with --unlabeled, with label dropout, or from an init source whose trained
    'no label' input is loaded; a run started with --unlabeled resumed with its own config.json (null_label on,
    label_dropout 0); null_label on from a source whose 'no label' input is not loaded (the channel is carried for
    the source's tensors to fit, as without the key)."""
    root, pool = example
    own = json.loads((with_unlabeled / "config.json").read_text())
    assert own["diffusion"]["null_label"] is True and own["diffusion"]["label_dropout"] == 0.0
    relabelled = _copy_of(with_unlabeled, "null_source_other_labels", _other_labels)
    for config, kwargs in [
            (GUIDED, {"unlabeled": [str(pool)]}),
            (own, {"unlabeled": [str(pool)]}),
            ({**GUIDED, "diffusion": {**MICRO["diffusion"], "label_dropout": 0.1}}, {}),
            (GUIDED, {"init_from": str(with_unlabeled)}),
            ({**MICRO, "diffusion": {**MICRO["diffusion"], "null_label": True}}, {"init_from": str(relabelled)})]:
        folder = _train(config, stop_after=1, **kwargs)
        assert json.loads((folder / "config.json").read_text())["diffusion"]["null_label"] is True


@pytest.mark.parametrize("case, message", [
    ("without", r"was trained without the 'no label' condition"),
    ("other_labels", r"its label set differs"),
    ("other_layout", r"reads the label map with another layout"),
    ("never_trained", r"never trained it"),
], ids=["without", "other_labels", "other_layout", "never_trained"])
def test_guidance_from_an_init_source_whose_no_label_input_is_not_loaded_is_refused(example, plain, with_unlabeled,
                                                                                    case, message):
    def untrained(run: dict, seen: dict) -> None:  # null_label on, but no unlabelled images, no dropout
        del run["unlabeled"]
    source = {"without": plain, "other_layout": with_unlabeled,
              "other_labels": _copy_of(with_unlabeled, "null_source_other_labels", _other_labels),
              "never_trained": _copy_of(with_unlabeled, "null_source_never_trained", untrained)}[case]
    config = {**GUIDED, "diffusion": {**MICRO["diffusion"], "edge_hint": case == "other_layout"}}
    folder = synthesizer_folder(EXAMPLE_NAME, "2d", 0)
    before = _listing(folder)
    with pytest.raises(DiffAugError, match=f"nothing trains the 'no label' condition.*{message}.*--unlabeled SOURCE"):
        _train(config, init_from=str(source))
    assert _listing(folder) == before


@pytest.mark.parametrize("edit, message", [
    ("channels", r"trained on 2 channel\(s\), Dataset990_ChestCTSlabs has 1"),
    ("validation", r"its weights have seen validation case\(s\) \['chest_000'\] of fold 0"),
    ("copy", r"seen labelled cases of Dataset998_ChestCopy whose images are validation cases of fold 0 .*"
             r"chest_000 = chest_000"),
])
def test_init_from_is_refused_for_other_channels_or_a_source_that_saw_validation_cases(example, source, edit, message):
    root, _ = example
    bad = root / f"bad_source_{edit}"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(source, bad)
    if edit == "channels":
        run = json.loads((bad / "synthesizer.json").read_text())
        run["spec"]["in_channels"] = 2
        (bad / "synthesizer.json").write_text(json.dumps(run))
    elif edit == "validation":  # as a synthesizer of fold 1 would have: fold 0's validation cases among its cases
        seen = json.loads((bad / "seen_data.json").read_text())
        seen["labelled_cases"][EXAMPLE_NAME].append("chest_000")
        (bad / "seen_data.json").write_text(json.dumps(seen))
    else:  # trained on a copy of this dataset under another name: only the contents can tell
        copy = root / "raw" / "Dataset998_ChestCopy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(root / "raw" / EXAMPLE_NAME, copy)
        seen = json.loads((bad / "seen_data.json").read_text())
        seen["labelled_cases"] = {"Dataset998_ChestCopy": ["chest_000", "chest_001"]}
        (bad / "seen_data.json").write_text(json.dumps(seen))
    with pytest.raises(DiffAugError, match=message):
        _train(MICRO, init_from=str(bad))


@pytest.mark.parametrize("source_dims", [2, 3])
def test_init_from_a_synthesizer_of_another_dimensionality_is_refused_naming_both_folders(example, plain,
                                                                                          source_dims):
    """A 2D synthesizer into a 3d_fullres fold, and (its files edited as a 3D one's would read) the reverse."""
    def as_3d(run: dict, seen: dict) -> None:
        run["spec"].update(spatial_dims=3, configuration="3d_fullres", patch_size=[4] + run["spec"]["patch_size"])
    source = plain if source_dims == 2 else _copy_of(plain, "plain_as_3d", as_3d)
    configuration = "3d_fullres" if source_dims == 2 else "2d"
    folder = synthesizer_folder(EXAMPLE_NAME, configuration, 0)
    before = _listing(folder)
    with pytest.raises(DiffAugError) as e:
        train_synthesizer(EXAMPLE_NAME, configuration, 0, _config(MICRO), device="cpu", seed=0, progress=False,
                          overwrite=True, init_from=str(source))
    dims = {2: "2D", 3: "3D"}
    assert f"--init-from {source}: a {dims[source_dims]} synthesizer" in str(e.value)
    assert f"this run's synthesizer ({folder}) is {dims[5 - source_dims]} (configuration {configuration!r})" \
        in str(e.value)
    assert _listing(folder) == before


@pytest.mark.parametrize("conditioning, spatial_dims", [("controlnet", 3), ("spade", 3), ("controlnet", 2)])
def test_guidance_runs_with_both_conditionings_in_2d_and_3d(conditioning, spatial_dims):
    """No training: a model with the 'no label' channel (weights perturbed, so ControlNet's zero convolutions
    pass the condition on) is guided as null + w * (conditional - null), and samples through every path."""
    from nnunet_diffaug.synthesis.conditioning import null_spatial
    from nnunet_diffaug.synthesis.data import DataSpec
    from nnunet_diffaug.synthesis.image_generator import GuidedModel
    config = _config({"base": "tiny", "diffusion": {"conditioning": conditioning, "null_label": True}})
    size = [16] * spatial_dims
    spec = DataSpec(dataset_name="Dataset999_X", configuration="3d_fullres" if spatial_dims == 3 else "2d",
                    plans_identifier="nnUNetPlans", fold=0, training_cases=["a"], spatial_dims=spatial_dims,
                    in_channels=1, label_values=[0, 1], normalization_schemes=["ZScoreNormalization"],
                    intensity_min=[-3.0], intensity_max=[3.0], patch_size=size)
    torch.manual_seed(0)
    syn = Synthesizer(config, spec, torch.device("cpu"))
    with torch.no_grad():
        for p in syn.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    labels = np.zeros((2, *size), dtype=np.int64)
    labels[(slice(None), *[slice(4, 12)] * spatial_dims)] = 1
    condition = syn.condition(torch.from_numpy(labels[:, None]))
    assert condition.spatial.shape[1] == spec.num_classes + 1
    z = torch.randn(2, config.autoencoder.latent_channels, *[s // config.latent_factor() for s in size])
    t = torch.full((2,), 500, dtype=torch.long)
    with torch.no_grad():
        cond = syn.model(z, t, condition)
        null = syn.model(z, t, type(condition)(null_spatial(condition.spatial)))
        guided = GuidedModel(syn.model, 2.5)(z, t, condition)
    assert not torch.allclose(cond, null, atol=1e-5)
    assert torch.allclose(guided, null + 2.5 * (cond - null), atol=1e-4)
    assert isinstance(syn.sampling_model(2.5), GuidedModel) and syn.sampling_model(1.0) is syn.model
    out = syn.generate(labels, syn.sampler("ddim", 2), torch.Generator().manual_seed(1), guidance=2.5)
    assert out.shape == (2, 1, *size) and np.isfinite(out).all()


def test_unlabelled_only_pretraining_serves_every_fold(example, source):
    """The recipe for many folds on one dataset: learn from the pool alone (blind to every labelled case), then
    start each fold's synthesizer from it; a synthesizer of another fold would be refused."""
    root, pool = example
    folder = train_synthesizer(EXAMPLE_NAME, "2d", None, _config(MICRO), device="cpu", seed=0, progress=False,
                               overwrite=True, unlabeled=[str(pool)], unlabeled_only=True)
    assert folder.name == "unlabeled_only"
    log = (folder / "training_log.txt").read_text()
    assert "(unlabelled images only), 0 training cases" in log
    assert "autoencoder: 2 unlabelled image(s) beside 0 labelled case(s), 100% of the samples unlabelled" in log
    assert "diffusion: 100% of each batch from 2 unlabelled image(s)" in log
    assert json.loads((folder / "seen_data.json").read_text())["labelled_cases"] == {}
    with pytest.raises(DiffAugError, match="learned from unlabelled images only"):
        Synthesizer.load(folder, torch.device("cpu"))
    for fold in (0, 1):
        tuned = train_synthesizer(EXAMPLE_NAME, "2d", fold, _config(MICRO), device="cpu", seed=0, progress=False,
                                  overwrite=True, init_from=str(folder))
        assert json.loads((tuned / "config.json").read_text())["diffusion"]["null_label"] is True  # as its source
        record = json.loads((tuned / "init_from_diffusion.json").read_text())
        assert record["loaded"] and record["not_loaded"] == []
        assert f"init-from: {folder} ({EXAMPLE_NAME}, unlabelled images only," in \
            (tuned / "training_log.txt").read_text()  # no fold: it has none
    # a fold-0 synthesizer (it trained on fold 1's validation cases) is refused for fold 1
    with pytest.raises(DiffAugError, match=r"its weights have seen validation case\(s\) \['chest_001'"):
        train_synthesizer(EXAMPLE_NAME, "2d", 1, _config(MICRO), device="cpu", seed=0, progress=False,
                          overwrite=True, init_from=str(source))


def test_unlabelled_only_refuses_any_labelled_case_of_the_dataset(example):
    root, pool = example
    bad = root / "pool_with_a_training_case"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(pool, bad)
    shutil.copy(_raw_image(root, "chest_003"), bad / "copy_0000.nii.gz")  # a training case of fold 0
    with pytest.raises(DiffAugError, match=r"copy_0000\.nii\.gz is labelled case chest_003 of "):
        train_synthesizer(EXAMPLE_NAME, "2d", None, _config(MICRO), device="cpu", seed=0, progress=False,
                          overwrite=True, unlabeled=[str(bad)], unlabeled_only=True)
    with pytest.raises(SystemExit):
        cli.train_synthesizer_entry(["-d", EXAMPLE_NAME, "-c", "2d", "--preset", "tiny"])  # -f, or --unlabeled-only


def _names_a_fold(text: str) -> bool:
    """Speaks of one fold ("fold 0", "this fold", "the fold's"), where --unlabeled-only uses none."""
    return re.search(r"fold -?\d|this fold|the fold's", text) is not None


def _unlabelled_only(pool: Path, **kwargs) -> Path:
    return train_synthesizer(EXAMPLE_NAME, "2d", None, _config(MICRO), device="cpu", progress=False,
                             unlabeled=[str(pool)], unlabeled_only=True, **{"seed": 0, **kwargs})


@pytest.mark.parametrize("seen_kind, message", [
    ("labelled", r"its weights have seen labelled case\(s\) \['chest_001', 'chest_003'"),
    ("unlabelled", r"its weights have seen labelled case\(s\) \['chest_000'\] of \S+ among its unlabelled images"),
    ("copy", r"labelled cases of Dataset998_ChestCopy whose images are labelled cases of \S+ .*chest_000 = chest_000"),
], ids=["labelled", "unlabelled", "copy"])
def test_unlabelled_only_refuses_an_init_source_naming_the_labelled_cases_not_a_fold(example, source, seen_kind,
                                                                                     message):
    root, pool = example

    def edit(run: dict, seen: dict) -> None:
        if seen_kind == "unlabelled":  # the source saw chest_000's image as an unlabelled image
            from nnunet_diffaug.unlabeled import validation_hashes
            plans = json.loads((root / "preprocessed" / EXAMPLE_NAME / "nnUNetPlans.json").read_text())
            seen["labelled_cases"] = {}
            seen["unlabeled_content_sha256"] = list(validation_hashes(EXAMPLE_NAME, ["chest_000"], plans, "test"))
        elif seen_kind == "copy":
            copy = root / "raw" / "Dataset998_ChestCopy"
            if not copy.is_dir():
                shutil.copytree(root / "raw" / EXAMPLE_NAME, copy)
            seen["labelled_cases"] = {"Dataset998_ChestCopy": ["chest_000"]}
    bad = _copy_of(source, f"unlabelled_only_bad_source_{seen_kind}", edit)
    with pytest.raises(DiffAugError, match=message) as e:
        _unlabelled_only(pool, overwrite=True, init_from=str(bad))
    assert not _names_a_fold(str(e.value)), str(e.value)


def test_unlabelled_only_needs_no_fold_and_its_messages_name_none(example, source, capsys):
    """Fold 0's cases are not read (one of them missing is no matter); the note on a source's labelled cases that
    cannot be compared and the refusals of a changed rerun speak of the dataset's labelled cases, not of a fold."""
    root, pool = example

    def absent_dataset(run: dict, seen: dict) -> None:
        seen["labelled_cases"] = {"Dataset997_Absent": ["case_a"]}
    other = _copy_of(source, "source_of_an_absent_dataset", absent_dataset)
    case = root / "preprocessed" / EXAMPLE_NAME / "nnUNetPlans_2d" / "chest_001.b2nd"  # a training case of fold 0
    aside = case.with_name("aside.b2nd")
    case.rename(aside)
    try:
        folder = _unlabelled_only(pool, overwrite=True, init_from=str(other), stop_after=1)
        out = capsys.readouterr().out
        assert "could not be compared by content with the dataset's labelled cases" in out
        assert not _names_a_fold(out), out
        for kwargs in ({"seed": 1, "init_from": str(other)}, {}):
            with pytest.raises(DiffAugError, match=re.escape(str(folder))) as e:
                _unlabelled_only(pool, **kwargs)
            assert not _names_a_fold(str(e.value)), str(e.value)
    finally:
        aside.rename(case)


# ---------------------------------------------------------------------------------------------- the benchmark arm

def test_the_unlabeled_arm_gives_its_synthesizer_the_pool_remainder_and_never_a_test_case(tmp_path, monkeypatch):
    from nnunet_diffaug.benchmark import BenchmarkSettings, builtin_arm, run_benchmark
    arm = builtin_arm("diffaug_r33_equalreal_unlabeled")
    assert arm.synthetic.unlabeled and arm.synthetic.key != builtin_arm("diffaug_r33_equalreal").synthetic.key
    assert dict(arm.env) == dict(builtin_arm("diffaug_r33_equalreal").env)
    assert builtin_arm("deformed_real_r33_unlabeled") is None
    dataset = toy_benchmark_dataset(tmp_path, monkeypatch)
    s = BenchmarkSettings(dataset=dataset, train_sizes=(2,), seeds=(0,), epochs=1, iterations=1,
                          test_cases=("toy_000", "toy_001", "toy_002"),
                          arms=("diffaug_r33", "diffaug_r33_unlabeled", "diffaug_r33_equalreal_unlabeled"))
    runner = RecordingRunner()
    run_benchmark(s, tmp_path / "ws", runner=runner)
    trained = [(cmd, env) for name, cmd, env in runner.calls if name == "diffaug_train_synthesizer"]
    assert len(trained) == 2  # one plain synthesizer, one with the remainder (shared by both _unlabeled arms)
    plain, with_pool = sorted(trained, key=lambda c: "--unlabeled" in c[0])
    assert Path(plain[1]["nnUNet_results"]).name == "synthesizer"
    assert Path(with_pool[1]["nnUNet_results"]).name == "synthesizer_unlabeled"
    folder = Path(with_pool[0][with_pool[0].index("--unlabeled") + 1])
    splits = json.loads((tmp_path / "ws" / "preprocessed" / dataset / "splits_final.json").read_text())
    labelled = set(splits[0]["train"])
    names = {p.name[: -len("_0000.nii.gz")] for p in folder.iterdir()}
    assert names == {f"toy_{i:03d}" for i in range(3, 8)} - labelled and len(names) == 3
    synthesized = [env["nnUNet_results"] for name, _, env in runner.calls if name == "diffaug_synthesize"]
    assert sorted(Path(r).name for r in synthesized) == ["synthesizer", "synthesizer_unlabeled"]
    sets = {Path(env["nnUNet_results"]).name: env["DIFFAUG_SYNTHETIC_DATASET"]
            for name, _, env in runner.calls if name == "nnUNetv2_train" and "DIFFAUG_SYNTHETIC_DATASET" in env}
    assert sets["diffaug_r33_unlabeled"] == sets["diffaug_r33_equalreal_unlabeled"] != sets["diffaug_r33"]


def test_the_benchmark_refuses_a_pool_image_that_is_a_test_case(tmp_path, monkeypatch):
    from nnunet_diffaug.benchmark import BenchmarkSettings, run_benchmark
    dataset = toy_benchmark_dataset(tmp_path, monkeypatch, duplicate=("toy_007", "toy_001"))
    s = BenchmarkSettings(dataset=dataset, train_sizes=(2,), seeds=(0,), epochs=1, iterations=1,
                          test_cases=("toy_000", "toy_001", "toy_002"), arms=("diffaug_r33_unlabeled",))
    runner = RecordingRunner()
    with pytest.raises(DiffAugError, match=r"Pool case toy_007's image .* same content as test case toy_001"):
        run_benchmark(s, tmp_path / "ws", runner=runner)
    assert runner.calls == []  # refused before anything ran
    s_all = BenchmarkSettings(dataset=dataset, train_sizes=("all",), seeds=(0,), epochs=1, iterations=1,
                              test_cases=("toy_000", "toy_001", "toy_002"), arms=("diffaug_r33_unlabeled",))
    with pytest.raises(DiffAugError, match="leaves no pool case outside"):
        run_benchmark(s_all, tmp_path / "ws_all", runner=runner)


def test_a_large_pool_keeps_a_bounded_number_of_files_open(tmp_path):
    import os
    import blosc2
    from nnunet_diffaug.synthesis import unlabeled_data
    from nnunet_diffaug.unlabeled import PreprocessedImage
    images = []
    for i in range(unlabeled_data.OPEN_ARRAYS + 40):
        path = str(tmp_path / f"img{i}.b2nd")
        blosc2.asarray(np.full((1, 2, 8, 8), i, dtype=np.float32), urlpath=path, mode="w")
        images.append(PreprocessedImage(f"h{i}", path, [1.0, 1.0, 1.0], [1, 2, 8, 8]))
    sampler = unlabeled_data.UnlabeledPatchSampler(images, [8, 8], spatial_dims=2)
    before = len(os.listdir("/proc/self/fd"))
    rng = np.random.default_rng(0)
    seen = {int(sampler.sample(rng)[0].max()) for _ in range(2000)}
    assert len(seen) == len(images)  # every image was read, each with its own content
    assert len(os.listdir("/proc/self/fd")) - before <= unlabeled_data.OPEN_ARRAYS


def test_init_from_a_source_without_the_no_label_condition_loads_no_half_layer(example, plain):
    root, pool = example
    folder = _train({**MICRO, "diffusion": {**MICRO["diffusion"], "steps": 1}, "autoencoder": {"steps": 1},
                     "checkpoint_every": 1}, init_from=str(plain), unlabeled=[str(pool)])
    record = json.loads((folder / "init_from_diffusion.json").read_text())
    not_loaded = {r["tensor"]: r["why"] for r in record["not_loaded"]}
    grown = {n[:-len("weight")] for n, why in not_loaded.items() if n.endswith(".weight") and why.startswith("shape")}
    assert grown and all("mlp_shared" in layer for layer in grown)  # the layers that read the condition map
    assert not [layer for layer in grown if layer + "bias" in record["loaded"]]
    assert {not_loaded[layer + "bias"] for layer in grown if layer + "bias" in not_loaded} == \
        {"its layer's weight was not loaded"}
