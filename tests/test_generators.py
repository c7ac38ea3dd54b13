"""Generators beyond the diffusion model: domain-randomised painting and the deformed-real control.

Neither needs a trained synthesizer: the integration tests run on the planned example where
diffaug_train_synthesizer never ran.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from support import EXAMPLE_ID, EXAMPLE_NAME, nnunet_folders, private_copy_of_example, trainer_accepts

from nnunet_diffaug import cli
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.provenance import read_provenance
from nnunet_diffaug.raw_dataset import load_dataset_json
from nnunet_diffaug.synthesis.config import SamplingConfig
from nnunet_diffaug.synthesis.generators.deformed_real import DeformedRealGenerator
from nnunet_diffaug.synthesis.generators.randomised import RandomisationRanges, paint_randomised
from nnunet_diffaug.synthesis.label_sources import DeformedRealLabels, source_image
from nnunet_diffaug.synthesis.synthesize import synthesize

CLIP = [(-4.0, 4.0)]


def _blocks() -> np.ndarray:
    lab = np.zeros((48, 48), dtype=np.uint8)
    lab[8:24, 8:40] = 1
    lab[28:44, 6:22] = 2
    lab[28:44, 26:42] = 3
    return lab


def _class_means(image: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    return np.array([image[labels == c].mean() for c in range(k)])


def _explained_variance(image: np.ndarray, labels: np.ndarray) -> float:
    """Share of the image's variance explained by the class means (eta squared)."""
    classes = np.unique(labels)
    between = sum((labels == c).sum() * (image[labels == c].mean() - image.mean()) ** 2 for c in classes)
    return float(between / (image.var() * image.size))


# ---------------------------------------------------------------------------------------------- randomised

def test_randomised_images_follow_their_labels_yet_differ_across_cases():
    lab = _blocks()
    means, shares = [], []
    for case in range(6):
        image, drawn = paint_randomised(lab, 5, CLIP, RandomisationRanges(), np.random.default_rng([0, case]))
        assert image.shape == (1, *lab.shape) and image.min() >= -4 and image.max() <= 4
        shares.append(_explained_variance(image[0], lab))
        means.append(_class_means(image[0], lab, 4))
    # the class structure dominates every case's intensities (bias, blur and noise do not wash it out):
    # between-class variance exceeds within-class variance (measured: 0.57 .. 0.91)
    assert min(shares) > 0.5, shares
    shuffled = np.random.default_rng(0).permutation(lab.ravel()).reshape(lab.shape)
    assert _explained_variance(image[0], shuffled) < 0.05  # it is these labels the image follows
    # ... yet the appearance is new each time: class means move between cases
    for a in range(len(means)):
        for b in range(a + 1, len(means)):
            assert np.max(np.abs(means[a] - means[b])) > 0.3
    # seeded: the same case paints the same image
    again, _ = paint_randomised(lab, 5, CLIP, RandomisationRanges(), np.random.default_rng([0, 0]))
    first, _ = paint_randomised(lab, 5, CLIP, RandomisationRanges(), np.random.default_rng([0, 0]))
    assert np.array_equal(again, first)


def test_each_channel_gets_its_own_appearance():
    lab = _blocks()
    image, drawn = paint_randomised(lab, 5, CLIP * 2, RandomisationRanges(), np.random.default_rng(3))
    assert image.shape[0] == 2 and drawn["channels"][0]["class_means"] != drawn["channels"][1]["class_means"]
    assert not np.allclose(_class_means(image[0], lab, 4), _class_means(image[1], lab, 4), atol=0.1)


def test_whole_volumes_of_2d_configurations_are_painted_slice_by_slice():
    vol = np.stack([_blocks()] * 3)
    changed = vol.copy()
    changed[2] = 3 - changed[2]
    ranges = RandomisationRanges(blur_sigma=(1.5, 1.5), downsample_probability=1.0)
    a, _ = paint_randomised(vol, 5, CLIP, ranges, np.random.default_rng(1), frozen_axes=1)
    b, _ = paint_randomised(changed, 5, CLIP, ranges, np.random.default_rng(1), frozen_axes=1)
    assert np.array_equal(a[:, :2], b[:, :2]) and not np.array_equal(a[:, 2], b[:, 2])
    c, _ = paint_randomised(changed, 5, CLIP, ranges, np.random.default_rng(1), frozen_axes=0)
    assert not np.array_equal(a[:, 1], c[:, 1])  # without freezing, blur crosses slices


def test_real_class_prior_keeps_the_real_contrast_between_classes_yet_varies_it():
    lab = _blocks()
    # a real case's classes: background dark, class 1 soft tissue, class 2 bright bone, class 3 absent (NaN)
    prior = np.array([[-1.5, 0.1], [0.2, 0.2], [2.5, 0.3], [np.nan, np.nan], [-2.0, 0.0]])[:, None, :]
    informed = RandomisationRanges(class_prior="real")
    errors = {"real": [], "uniform": []}
    means = []
    for case in range(8):
        for name, ranges in (("real", informed), ("uniform", RandomisationRanges())):
            image, drawn = paint_randomised(lab, 5, CLIP, ranges, np.random.default_rng([1, case]), prior=prior)
            m = _class_means(image[0], lab, 3)
            errors[name].append(np.abs(m - prior[:3, 0, 0]))
            if name == "real":
                means.append(m)
                assert m[2] > m[1] > m[0], m  # bone brighter than soft tissue brighter than background, every case
                assert _explained_variance(image[0], lab) > 0.5
                assert np.isfinite(image).all() and np.isfinite(drawn["channels"][0]["class_means"][3])
    # each class ends near its real intensity (shifted by the drawn prior), far nearer than any-contrast painting
    assert np.median(errors["real"]) < 0.3 < np.median(errors["uniform"]), errors
    assert np.median(errors["real"]) < 0.3 * np.median(errors["uniform"])
    assert np.std(np.array(means), axis=0).min() > 0.05  # still a new appearance per case
    with pytest.raises(ValueError, match="real class statistics"):
        paint_randomised(lab, 5, CLIP, informed, np.random.default_rng(0))  # no statistics: refused


def test_class_prior_in_ranges_files_and_in_recorded_sets(tmp_path):
    path = tmp_path / "ranges.json"
    path.write_text(json.dumps({"class_prior": "real", "prior_mean_shift": 0.5, "prior_sd_scale": [1, 2]}))
    r = RandomisationRanges.from_json_file(path)
    assert (r.class_prior, r.prior_mean_shift, r.prior_sd_scale) == ("real", 0.5, (1.0, 2.0))
    assert r.to_json()["class_prior"] == "real"
    # a uniform-prior set records its ranges as sets made before the prior existed did, so those still resume
    assert not {"class_prior", "prior_mean_shift", "prior_sd_scale"} & set(RandomisationRanges().to_json())
    for content, words in (({"class_prior": "measured"}, "'class_prior' must be one of ['uniform', 'real']"),
                           ({"prior_mean_shift": -1}, "'prior_mean_shift' must not be negative")):
        path.write_text(json.dumps(content))
        with pytest.raises(DiffAugError) as e:
            RandomisationRanges.from_json_file(path)
        assert str(path) in str(e.value) and words in str(e.value), str(e.value)


def test_ranges_file_sets_a_subset_and_refuses_unknown_keys_and_bad_values(tmp_path):
    good = tmp_path / "ranges.json"
    good.write_text(json.dumps({"mean": [-1, 1], "noise_sd": [0, 0], "clip": [-3, 3]}))
    r = RandomisationRanges.from_json_file(good)
    assert r.mean == (-1.0, 1.0) and r.clip == (-3.0, 3.0) and r.sd == RandomisationRanges().sd
    for content, words in (({"means": [0, 1]}, "unknown key(s) ['means']"),
                           ({"mean": [2, 1]}, "low <= high"),
                           ({"sd": [-1, 1]}, "'sd' must not be negative"),
                           ({"downsample_probability": 2}, "[0, 1]"),
                           ({"bias_grid": "4"}, "must be a number"),
                           ([1, 2], "JSON object")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(content))
        with pytest.raises(DiffAugError) as e:
            RandomisationRanges.from_json_file(bad)
        assert str(bad) in str(e.value) and words in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------- integration

@pytest.fixture(scope="module")
def root(planned_example, tmp_path_factory):
    """A private copy of the planned example; no synthesizer was ever trained in it."""
    with nnunet_folders(private_copy_of_example(planned_example[0], tmp_path_factory.mktemp("generators"))) as dst:
        yield dst


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_randomised_set_without_a_synthesizer_is_accepted_by_the_trainer(root):
    args = ["-d", str(EXAMPLE_ID), "-f", "0", "-c", "3d_fullres", "-n", "3", "--generator", "randomised",
            "--seed", "1", "-device", "cpu"]
    cli.synthesize_entry(args)
    [out] = [p for p in (root / "raw").iterdir() if p.name.endswith("SynthF0")]
    assert len(trainer_accepts(out, "3d_fullres", root)) == 3
    prov = read_provenance(out)
    assert prov.generator["kind"] == "domain_randomised" and prov.generator["label_mode"] == "real"
    assert prov.generator["randomisation"] == RandomisationRanges().to_json()
    splits = json.loads((root / "preprocessed" / EXAMPLE_NAME / "splits_final.json").read_text())
    assert prov.training_cases == sorted(splits[0]["train"]) and prov.configuration == "3d_fullres"
    real_values = set(load_dataset_json(root / "raw" / EXAMPLE_NAME)["labels"].values())
    class_means = []
    for i in range(3):
        record = json.loads((out / "diffaug_cases" / f"synth_{i:05d}.json").read_text())
        assert record["generator"] == "randomised" and record["source_case"] in prov.training_cases
        image, labels = _array(out / "imagesTr" / f"synth_{i:05d}_0000.nii.gz"), _array(out / "labelsTr" / f"synth_{i:05d}.nii.gz")
        assert set(np.unique(labels).tolist()) <= real_values
        assert _explained_variance(image, labels) > 0.5  # raw (HU) images still follow their labels
        class_means.append([image[labels == v].mean() for v in (0, 5)])
    assert not np.allclose(class_means[0], class_means[1], atol=20)  # HU: a new appearance per case

    # the same request continues the same set; another generator never writes into it
    cli.synthesize_entry(args[:7] + ["4"] + args[8:])
    assert [p for p in (root / "raw").iterdir() if p.name.endswith("SynthF0")] == [out]
    assert (out / "labelsTr" / "synth_00003.nii.gz").is_file()
    control = synthesize(EXAMPLE_ID, "3d_fullres", 0, 2, generator="deformed-real", seed=1, progress=False)
    assert control != out and read_provenance(control).generator["kind"] == "deformed_real"
    assert len(trainer_accepts(control, "3d_fullres", root)) == 2


def test_real_class_prior_paints_each_case_in_its_source_cases_contrast(root):
    out = synthesize(EXAMPLE_ID, "3d_fullres", 0, 3, generator="randomised", class_prior="real", seed=2,
                     output_id=962, progress=False)
    assert read_provenance(out).generator["randomisation"]["class_prior"] == "real"
    values = sorted(load_dataset_json(root / "raw" / EXAMPLE_NAME)["labels"].values())
    for i in range(3):
        record = json.loads((out / "diffaug_cases" / f"synth_{i:05d}.json").read_text())
        source = record["source_case"]
        assert record["randomisation"]["prior_case"] == source
        image, labels = _array(out / "imagesTr" / f"synth_{i:05d}_0000.nii.gz"), _array(out / "labelsTr" / f"synth_{i:05d}.nii.gz")
        real = _array(root / "raw" / EXAMPLE_NAME / "imagesTr" / f"{source}_0000.nii.gz")
        real_labels = _array(root / "raw" / EXAMPLE_NAME / "labelsTr" / f"{source}.nii.gz")
        # foreground only: the raw background holds the scanner's padding, which no painting reproduces
        shared = [v for v in values if v > 0 and (labels == v).any() and (real_labels == v).any()]
        painted = [image[labels == v].mean() for v in shared]
        measured = [real[real_labels == v].mean() for v in shared]
        # HU per class follow the source case's (lungs dark, bone bright), not a random contrast
        assert len(shared) >= 4 and np.corrcoef(painted, measured)[0, 1] > 0.9, (shared, painted, measured)
    with pytest.raises(DiffAugError, match="--class-prior"):
        synthesize(EXAMPLE_ID, "3d_fullres", 0, 1, generator="deformed-real", class_prior="real", progress=False)


def test_randomised_real_aligned_keeps_each_training_case_on_its_grid(root):
    out = synthesize(EXAMPLE_ID, "2d", 0, 2, labels="real-aligned", generator="randomised", output_id=961,
                     progress=False)
    trainer_accepts(out, "2d", root)
    cases = read_provenance(out).training_cases
    for i in range(2):
        real = _array(root / "raw" / EXAMPLE_NAME / "labelsTr" / f"{cases[i]}.nii.gz")
        assert np.array_equal(_array(out / "labelsTr" / f"synth_{i:05d}.nii.gz"), real)  # the full volume


def test_deformed_real_moves_image_and_labels_together(root):
    from nnunet_diffaug.synthesis.data import FoldData
    data = FoldData(EXAMPLE_ID, "2d", 0)
    identity = DeformedRealGenerator(data, SamplingConfig(rotate_degrees=0, scale_range=0, translate_fraction=0))
    moving = DeformedRealGenerator(data)
    for index in range(3):
        draw = DeformedRealLabels(data).draw(index, 0, np.random.default_rng([0, index]), identity)
        real_image = source_image(data, draw.source, draw.source_slice)
        real_labels = data.label_volume(draw.source)[draw.source_slice]
        image, _ = identity.paint(draw, np.random.default_rng(0))
        np.testing.assert_allclose(image, real_image, atol=1e-4)  # no deformation: the real image itself
        assert np.array_equal(draw.labels, real_labels)

        draw = DeformedRealLabels(data).draw(index, 0, np.random.default_rng([0, index]), moving)
        image, _ = moving.paint(draw, np.random.default_rng(0))
        assert np.mean(np.abs(image - real_image)) > 0.05 and not np.array_equal(draw.labels, real_labels)
        # the labels still describe the moved image as well as the real labels describe the real image,
        # far better than the unmoved labels do
        together = _explained_variance(image[0], draw.labels)
        assert together > 0.9 * _explained_variance(real_image[0], real_labels)
        assert together > _explained_variance(image[0], real_labels) + 0.02


def _entries(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("extra, words", [
    (["--generator", "deformed-real", "--labels", "generated"], "a generated label map has no real image"),
    (["--generator", "deformed-real", "--labels", "real-aligned"], "only copy the training cases"),
    (["--generator", "randomised", "--sampler", "ddim"], "--sampler do(es) not apply to --generator randomised"),
    (["--generator", "deformed-real", "--randomisation", "x.json"], "--randomisation do(es) not apply"),
    (["--generator", "randomised", "--randomisation", "RANGES"], "unknown key(s) ['noise']"),
    (["--generator", "randomised", "--randomisation", "MISSING"], "no such file"),
    (["--generator", "randomised", "--labels", "generated"], "no synthesizer was trained here"),
    (["--generator", "randomised", "--calibrate-intensity"], "--calibrate-intensity do(es) not apply"),
])
def test_bad_generator_requests_are_refused_before_anything_is_written(root, tmp_path, capsys, extra, words):
    ranges = tmp_path / "ranges.json"
    ranges.write_text(json.dumps({"noise": [0, 1]}))
    extra = [str(ranges) if a == "RANGES" else str(tmp_path / "missing.json") if a == "MISSING" else a for a in extra]
    before = _entries(root)
    with pytest.raises(SystemExit) as e:
        cli.synthesize_entry(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "2d", "-n", "2", "-device", "cpu", *extra])
    assert e.value.code != 0
    message = capsys.readouterr().err
    assert words in message, message
    assert _entries(root) == before


def test_unknown_generator_is_refused(root, capsys):
    with pytest.raises(DiffAugError, match="--generator 'gan' is not available"):
        synthesize(EXAMPLE_ID, "2d", 0, 2, generator="gan")
    with pytest.raises(SystemExit):
        cli.synthesize_entry(["-d", str(EXAMPLE_ID), "-f", "0", "-n", "2", "--generator", "gan"])
    assert "invalid choice: 'gan'" in capsys.readouterr().err
