"""Edge hint and tag conditioning of the image model, trained for real on a toy dataset made to test them.

Toy cases: a labelled bright disc and an UNLABELLED bright bar on a noisy background. The bar's place
is in the image only, so only the image edges of the hint can tell the model where to paint it.
Two of fold 0's four training cases are coarse acquisitions (4x the in-plane spacing): nnU-Net
resamples them to the fine target spacing and they look blurred; the spacing tag must carry that.

One 2D synthesizer with both options is trained for the module (about a minute on 2 cores).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import SimpleITK as sitk
import torch

from support import console_script, nnunet_env, nnunet_folders, run, write_raw_dataset, write_splits

from nnunet_diffaug import cli
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.paths import synthesizer_folder
from nnunet_diffaug.provenance import read_provenance
from nnunet_diffaug.raw_dataset import list_cases, load_dataset_json
from nnunet_diffaug.synthesis.data import FoldData
from nnunet_diffaug.synthesis.synthesizer import Synthesizer

pytestmark = pytest.mark.slow

TOY_ID, TOY_NAME = 991, "Dataset991_ToyDiscsBars"
COARSE_CASES = ("toy_001", "toy_003")   # two of fold 0's training cases (the odd ones, see write_splits)
FINE, COARSE = [3.0, 1.0, 1.0], [3.0, 4.0, 4.0]  # acquisition spacings, nnU-Net's axis order
BOTH_OPTIONS = {"base": "tiny", "diffusion": {"edge_hint": True, "tag_conditioning": True}}


def _toy_case(rng: np.random.Generator, size: int = 64, slices: int = 4):
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(20, 44, 2)
    r = int(rng.integers(8, 13))
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    near_disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 4) ** 2
    while True:  # a 12x4 bar, upright or lying, clear of the disc
        bar = np.zeros((size, size), bool)
        y0, x0 = rng.integers(2, size - 14, 2)
        h, w = (12, 4) if rng.random() < 0.5 else (4, 12)
        bar[y0:y0 + h, x0:x0 + w] = True
        if not (bar & near_disc).any():
            break
    image = np.where(disc, 200.0, np.where(bar, 120.0, 0.0))[None].repeat(slices, 0)
    image = image + rng.normal(0, 10, image.shape)
    return image, disc.astype(np.uint8)[None].repeat(slices, 0)


def build_toy_dataset(raw_root: Path, n_cases: int = 8, coarse_factor: int = 4) -> Path:
    rng = np.random.default_rng(0)
    cases = {}
    for i in range(n_cases):
        case_id = f"toy_{i:03d}"
        image, label = _toy_case(rng)
        spacing = (1.0, 1.0, 3.0)  # SimpleITK order (x, y, z)
        if case_id in COARSE_CASES:  # acquired at 4x coarser in-plane spacing: block averages, sparser labels
            f = coarse_factor
            z, h, w = image.shape
            image = image.reshape(z, h // f, f, w // f, f).mean(axis=(2, 4))
            label = label[:, f // 2::f, f // 2::f]
            spacing = (float(f), float(f), 3.0)
        cases[case_id] = (image.astype(np.float32), label, spacing)
    return write_raw_dataset(raw_root / TOY_NAME, cases, "MR", {"background": 0, "disc": 1})


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    build_toy_dataset(root / "raw")
    run([console_script("nnUNetv2_plan_and_preprocess"), "-d", str(TOY_ID), "-c", "2d", "3d_fullres",
         "-np", "1", "-npfp", "1"], nnunet_env(root))
    write_splits(root / "preprocessed" / TOY_NAME, [f"toy_{i:03d}" for i in range(8)])
    with nnunet_folders(root):
        yield root


@pytest.fixture(scope="module")
def trained_2d(toy_root):
    config = toy_root / "both_options.json"
    config.write_text(json.dumps(BOTH_OPTIONS))
    cli.train_synthesizer_entry(["-d", str(TOY_ID), "-f", "0", "-c", "2d", "--preset", str(config), "-device", "cpu",
                                 "--seed", "0"])
    return Synthesizer.load(synthesizer_folder(TOY_NAME, "2d", 0), torch.device("cpu"))


def _first_slices(fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N, H, W), images (N, 1, H, W)) of the training cases of ``fold``, preprocessed."""
    data = FoldData(TOY_ID, "2d", fold)
    labels = np.stack([data.label_volume(c)[0] for c in data.training_cases])
    images = np.stack([np.asarray(data.case(c)[0][:, 0], dtype=np.float32) for c in data.training_cases])
    return labels, images


def _bar_masks(labels: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the unlabelled bar is (bright, unlabelled) and the plain background well away from anything."""
    bright = images[:, 0] > images[:, 0][labels == 0].mean() + 0.3 * np.ptp(images[:, 0])
    bar = np.stack([ndi.binary_opening(b & (lab == 0)) for b, lab in zip(bright, labels)])
    background = (labels == 0) & ~np.stack([ndi.binary_dilation(b | (lab == 1), iterations=3)
                                            for b, lab in zip(bar, labels)])
    return bar, background


def _edge_sharpness(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean gradient magnitude in a band around each disc's border: lower = more blurred."""
    out = []
    for image, lab in zip(images, labels):
        band = ndi.binary_dilation(lab == 1, iterations=2) & ~ndi.binary_erosion(lab == 1, iterations=2)
        out.append(np.hypot(*np.gradient(image[0]))[band].mean())
    return np.array(out)


def test_edge_hint_paints_what_only_the_real_image_shows(trained_2d):
    # fold 0's validation cases (fold 1's training cases): discs and bars the synthesizer never saw
    labels, images = _first_slices(fold=1)
    bar, background = _bar_masks(labels, images)
    assert all(b.sum() >= 30 for b in bar)

    def bar_contrast(painted: np.ndarray) -> np.ndarray:
        return np.array([p[0][b].mean() - p[0][bg].mean() for p, b, bg in zip(painted, bar, background)])

    smp = trained_2d.sampler("dpmpp", 10)
    with_image = trained_2d.generate(labels, smp, torch.Generator().manual_seed(0), edge_images=images, spacing=FINE)
    labels_only = trained_2d.generate(labels, smp, torch.Generator().manual_seed(0), spacing=FINE)
    hinted, unhinted = bar_contrast(with_image), bar_contrast(labels_only)
    # measured: hinted 0.13-0.52 (real 1.8-2.4), unhinted -0.03 on every case
    assert np.all(hinted > unhinted)
    assert hinted.mean() > unhinted.mean() + 0.1


def test_spacing_tag_paints_coarse_acquisitions_blurred(trained_2d):
    real_labels, real_images = _first_slices(fold=0)
    data = FoldData(TOY_ID, "2d", 0)
    coarse_case = np.array([data.acquisition_spacing(c)[1] > 2 for c in data.training_cases])
    real = _edge_sharpness(real_images, real_labels)
    assert real[coarse_case].max() < real[~coarse_case].min()  # the toy does what it says (0.7 vs 1.4)

    labels, _ = _first_slices(fold=1)
    smp = trained_2d.sampler("dpmpp", 10)
    fine = trained_2d.generate(labels, smp, torch.Generator().manual_seed(0), spacing=FINE)
    coarse = trained_2d.generate(labels, smp, torch.Generator().manual_seed(0), spacing=COARSE)
    fine_sharpness, coarse_sharpness = _edge_sharpness(fine, labels), _edge_sharpness(coarse, labels)
    # measured: coarse 7-12% less sharp on every case; same labels and noise, only the tag differs
    assert np.all(coarse_sharpness < fine_sharpness)
    assert coarse_sharpness.mean() < 0.97 * fine_sharpness.mean()


def test_synthesized_cases_record_their_hints_and_the_trainer_accepts_them(trained_2d, toy_root):
    out = _synthesize(num_cases=3, labels="real", output_id=951)
    records = _records(out)
    assert all(r["edge_hint"] == "labels+image" for r in records)
    assert all(r["spacing_tag"] in (FINE, COARSE) for r in records)
    provenance = read_provenance(out)
    assert provenance.generator["edge_hint"] and provenance.generator["tag_conditioning"]
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(c["label"])) for c in
              list_cases(out, load_dataset_json(out)).values()]
    assert all(set(np.unique(lab)) <= {0, 1} and lab.any() for lab in labels)

    asked = _synthesize(num_cases=2, labels="real-aligned", spacing=COARSE, output_id=952)
    assert all(r["spacing_tag"] == COARSE and r["edge_hint"] == "labels+image" for r in _records(asked))
    assert read_provenance(asked).generator["spacing_tag"] == COARSE

    from nnunet_diffaug.trainers.synthetic_source import validate_synthetic_dataset
    splits = json.loads((toy_root / "preprocessed" / TOY_NAME / "splits_final.json").read_text())
    real_json = load_dataset_json(toy_root / "raw" / TOY_NAME)
    for folder in (out, asked):
        assert len(validate_synthetic_dataset(folder, real_json, TOY_NAME, 0, "2d", splits[0]["val"], is_3d=False))


def test_3d_synthesizer_with_both_options_trains_and_synthesizes(toy_root):
    config = toy_root / "both_options_3d.json"
    config.write_text(json.dumps({**BOTH_OPTIONS, "autoencoder": {"steps": 10}, "checkpoint_every": 10,
                                  "diffusion": {**BOTH_OPTIONS["diffusion"], "steps": 10, "scale_factor_batches": 2},
                                  "montage_cases": 2}))
    cli.train_synthesizer_entry(["-d", str(TOY_ID), "-f", "0", "-c", "3d_fullres", "--preset", str(config),
                                 "-device", "cpu", "--seed", "0"])
    out = _synthesize("3d_fullres", num_cases=1, labels="real", output_id=953, steps=3)
    (record,) = _records(out)
    assert record["edge_hint"] == "labels+image" and record["spacing_tag"] in (FINE, COARSE)


def test_spacing_is_refused_for_a_synthesizer_without_tags(toy_root, tmp_path):
    config = tmp_path / "plain.json"
    config.write_text(json.dumps({"base": "tiny", "autoencoder": {"steps": 2}, "diffusion": {"steps": 2,
                                  "scale_factor_batches": 1}, "checkpoint_every": 2, "montage_cases": 1}))
    cli.train_synthesizer_entry(["-d", str(TOY_ID), "-f", "1", "-c", "2d", "--preset", str(config), "-device", "cpu"])
    with pytest.raises(DiffAugError, match="trained without tag conditioning"):
        _synthesize(fold=1, num_cases=1, spacing=[3.0, 1.0, 1.0], output_id=954)
    assert not list((toy_root / "raw").glob("Dataset954_*"))
    with pytest.raises(DiffAugError, match="three positive spacings"):
        _synthesize(fold=1, num_cases=1, spacing=[3.0, 0.0, 1.0], output_id=954)


def _synthesize(configuration: str = "2d", fold: int = 0, **kwargs) -> Path:
    from nnunet_diffaug.synthesis.synthesize import synthesize
    # what the model paints is under test, so without the per-class calibration that would mask it
    kwargs.setdefault("calibrate_intensity", False)
    return synthesize(TOY_ID, configuration, fold, steps=kwargs.pop("steps", 5), device="cpu", progress=False,
                      **kwargs)


def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder / "diffaug_cases").glob("*.json"))]
