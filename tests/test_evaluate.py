"""diffaug_evaluate: the metrics behave as metrics, on a tiny nnU-Net trained by its own console script.

Synthetic sets used as probes (all for fold 0 of the example, in a private copy of it):
- stand-in: deformed real training cases (images follow their labels)
- noise: the same label maps with noise images
- copy: an exact and a rescaled copy of training cases, a training label map painted with new texture, and
  a noise case (memorisation must flag the copies only)
and two sets written by diffaug_synthesize: a briefly trained 3D synthesizer and an untrained one.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffaug import cli
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.evaluation import Settings, evaluate, resolve_inputs
from nnunet_diffaug.provenance import SyntheticProvenance
from nnunet_diffaug.raw_dataset import list_cases, load_dataset_json
from nnunet_diffaug.synthetic_writer import SyntheticDatasetWriter
from support import (EXAMPLE_NAME, JUDGE, make_stand_in_synthetic_set, nnunet_folders,
                     private_copy_of_example)

pytestmark = pytest.mark.slow
TRAINER, PLANS, CONFIG = JUDGE
FAST = Settings(device="cpu", use_mirroring=False, progress=False)


def _write_set(raw, dataset_id, fold, training_cases, cases):
    """cases: [(case_id, image array or None for an exact copy, source case)] -> synthetic raw dataset."""
    real_folder = raw / EXAMPLE_NAME
    real_json, real = load_dataset_json(real_folder), list_cases(raw / EXAMPLE_NAME)
    prov = SyntheticProvenance(source_dataset=EXAMPLE_NAME, fold=fold, configuration=CONFIG,
                               training_cases=list(training_cases), generator={"kind": "test probe"}, seed=0)
    folder = raw / f"Dataset{dataset_id:03d}_ProbeSynthF{fold}"
    writer = SyntheticDatasetWriter(folder, real_json, prov)
    for case_id, array, source in cases:
        image = sitk.ReadImage(real[source]["images"][0])
        if array is not None:
            new = sitk.GetImageFromArray(array.astype(np.float32))
            new.CopyInformation(image)
            image = new
        writer.write_case(case_id, [image], sitk.ReadImage(real[source]["label"]), {"source_case": source})
    writer.finalize()
    return folder


def _real_arrays(raw, source):
    """(image, label) arrays of a real case."""
    def read(sub, name):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(raw / EXAMPLE_NAME / sub / name)))
    return read("imagesTr", f"{source}_0000.nii.gz"), read("labelsTr", f"{source}.nii.gz")


def _noise_like(raw, source, rng):
    ref = _real_arrays(raw, source)[0]
    return rng.normal(ref.mean(), ref.std(), size=ref.shape)


def _rescaled_copy(raw, source, rng):
    """A training case with its intensities scaled and noise added: still a copy of its anatomy."""
    ref = _real_arrays(raw, source)[0]
    return ref * 1.05 + rng.normal(0, 20, size=ref.shape)


def _painted(raw, source, rng):
    """A training case's label map painted anew: each class its real mean and spread, new texture.

    What a synthesizer does with --labels real-aligned: the anatomy is reused by design, the image is not copied.
    """
    ref, label = _real_arrays(raw, source)
    out = np.empty(ref.shape)
    for c in np.unique(label):
        inside = label == c
        out[inside] = rng.normal(ref[inside].mean(), ref[inside].std(), size=int(inside.sum()))
    return out


@pytest.fixture(scope="module")
def judge(planned_example, judged_example, tmp_path_factory):
    """A private copy of the example with a tiny real-trained nnU-Net (fold 0) and three probe sets."""
    _, splits = planned_example
    root = private_copy_of_example(judged_example, tmp_path_factory.mktemp("evaluate"), with_results=True)
    with nnunet_folders(root):
        yield from _judge(root, splits)


def _judge(root, splits):
    raw, train = root / "raw", splits[0]["train"]
    rng = np.random.default_rng(0)
    sets = {
        "stand_in": make_stand_in_synthetic_set(raw, EXAMPLE_NAME, 0, train, 4, dataset_id=921),
        "noise": _write_set(raw, 922, 0, train, [(f"noise_{i}", _noise_like(raw, c, rng), c)
                                                 for i, c in enumerate(train)]),
        "copy": _write_set(raw, 923, 0, train, [("copy_0", None, train[0]),
                                                ("rescaled_1", _rescaled_copy(raw, train[1], rng), train[1]),
                                                ("painted_2", _painted(raw, train[2], rng), train[2]),
                                                ("noise_3", _noise_like(raw, train[3], rng), train[3])]),
    }
    yield root, splits, sets


@pytest.fixture(scope="module")
def results(judge, tmp_path_factory):
    """The three probe sets evaluated in-process (no test-time mirroring, for speed)."""
    _, _, sets = judge
    out = tmp_path_factory.mktemp("evaluations")
    return {name: evaluate(resolve_inputs(EXAMPLE_NAME, 0, synthetic=str(folder), trainer=TRAINER, plans=PLANS,
                                          configuration=CONFIG), out / name, FAST)
            for name, folder in sets.items()}


def _entry(argv):
    return cli.evaluate_entry([str(a) for a in argv])


# ------------------------------------------------------------------------------------------------
# the metrics behave as metrics
# ------------------------------------------------------------------------------------------------

def test_images_that_follow_their_labels_score_better_than_noise(results):
    good, noise = results["stand_in"], results["noise"]
    fid_good = good["label_fidelity"]["synthetic"]["foreground_mean_dice"]
    fid_noise = noise["label_fidelity"]["synthetic"]["foreground_mean_dice"]
    fid_real = good["label_fidelity"]["validation"]["foreground_mean_dice"]
    assert fid_good > fid_noise + 0.1
    assert fid_noise < 0.5 * fid_real  # the judge cannot read noise
    # realism: noise is far from the real validation cases, much farther than real training cases are
    fd_noise = noise["realism"]["frechet_synthetic_vs_validation"]
    fd_good = good["realism"]["frechet_synthetic_vs_validation"]
    fd_real = good["realism"]["frechet_training_vs_validation"]
    assert fd_noise > 3 * fd_real and fd_noise > 3 * fd_good
    # the reference does not depend on the synthetic set
    assert fd_real == pytest.approx(noise["realism"]["frechet_training_vs_validation"])


def test_fréchet_distance_of_a_set_with_itself_is_zero(judge):
    from nnunet_diffaug.evaluation.nnunet_model import TrainedModel
    from nnunet_diffaug.evaluation.realism import frechet_distance, standardiser
    root, splits, _ = judge
    model = TrainedModel(root / "results" / EXAMPLE_NAME / f"{TRAINER}__{PLANS}__{CONFIG}", 0, use_mirroring=False)
    cases = list_cases(root / "raw" / EXAMPLE_NAME)
    feats = {c: model.encoder_features(model.preprocess(c, cases[c]).data) for c in sorted(cases)}
    val = np.concatenate([feats[c] for c in splits[0]["val"]])
    train = np.concatenate([feats[c] for c in splits[0]["train"]])
    z = standardiser(np.concatenate([train, val]))
    assert frechet_distance(z(val), z(val)) < 1e-6
    assert frechet_distance(z(train), z(val)) > 100 * frechet_distance(z(val), z(val)) + 1e-3


def test_copies_of_training_cases_are_flagged_and_painted_label_maps_and_noise_are_not(results, judge):
    _, splits, _ = judge
    train = splits[0]["train"]
    memo = results["copy"]["memorisation"]
    assert memo["flagged"] == ["copy_0", "rescaled_1"]
    cases = results["copy"]["per_synthetic_case"]
    assert cases["copy_0"]["memorisation_nearest_training_case"] == train[0]
    assert cases["copy_0"]["memorisation_distance"] < 1e-4
    # a global intensity change and voxel noise do not hide a copy
    assert cases["rescaled_1"]["memorisation_nearest_training_case"] == train[1]
    # a training label map with new texture: close in image distance (the image distance alone would flag it),
    # but not in texture distance: reused anatomy, not a copy
    painted = cases["painted_2"]
    assert painted["memorisation_nearest_training_case"] == train[2]
    assert painted["memorisation_distance"] < memo["threshold_from_real"]
    assert painted["memorisation_texture_distance"] > memo["texture_threshold_from_real"]
    assert memo["reused_anatomy"] == ["painted_2"]
    assert results["noise"]["memorisation"]["flagged"] == []
    # warped training cases lie closer to the training cases than real cases lie to each other
    stand_in = results["stand_in"]["memorisation"]
    assert stand_in["synthetic_nearest_median"] < stand_in["real_nearest_median"]


def test_texture_distance_is_the_correlation_of_what_the_label_map_does_not_explain():
    from nnunet_diffaug.evaluation.memorisation import ncc_distances, texture_distances
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(5, 200))
    fractions = np.stack([np.stack([lab == k for k in range(3)]) for lab in labels]).astype(float)
    b = rng.normal(size=(5, 2, 200)) + 5 * fractions[:, :1]
    a = np.concatenate([b[2:3] * 1.1, rng.normal(size=(3, 2, 200))])
    expected = np.empty((4, 5))
    for j in range(5):  # brute force: residuals of a least-squares fit on the class indicators and a constant
        design = np.concatenate([fractions[j], np.ones((1, 200))]).T
        projection = design @ np.linalg.pinv(design)
        ra, rb = [(x - x @ projection).reshape(len(x), -1) for x in (a, b[j:j + 1])]
        expected[:, j] = ncc_distances(ra, rb)[:, 0]
    assert texture_distances(a, b, fractions, chunk=2) == pytest.approx(expected, abs=1e-9)
    assert expected[0, 2] == pytest.approx(0.0, abs=1e-9)  # a rescaled copy shares its texture


def test_label_statistics_compare_distributions(results):
    # the noise set reuses the training label maps: its label statistics are exactly the training cases'
    lab = results["noise"]["label_statistics"]
    assert lab["mean_fraction_w1_synthetic_vs_validation"] == pytest.approx(
        lab["mean_fraction_w1_training_vs_validation"])
    assert lab["mean_components_w1_synthetic_vs_validation"] == pytest.approx(
        lab["mean_components_w1_training_vs_validation"])
    # warped labels change volumes a little, not a lot
    stand_in = results["stand_in"]["label_statistics"]
    assert 0 < stand_in["mean_fraction_w1_synthetic_vs_validation"] < 0.05


def test_class_intensity_tells_painted_structures_from_noise(results):
    # deformed real cases paint every class near its real intensity; noise paints every class alike, so the
    # lungs (air), the bone and the soft tissue are far from their real intensities
    stand_in, noise = results["stand_in"]["class_intensity"], results["noise"]["class_intensity"]
    for c, entry in stand_in["per_class"].items():
        assert entry["standardised_difference"][0] < noise["per_class"][c]["standardised_difference"][0], c
    assert noise["worst_standardised_difference"] > 5 * stand_in["worst_standardised_difference"]
    # the stand-in's worst class is the thin ribs: its linear-interpolated warp mixes them with the soft tissue
    # around them (partial volume), which the metric sees as ribs painted darker than real ribs (measured: 2.8
    # real between-case sds darker; every other class within 1.8)
    ribs = stand_in["per_class"]["1"]
    assert stand_in["worst_class"] == "1" and ribs["mean"]["synthetic"][0] < ribs["real_mean"][0]
    assert results["stand_in"]["class_names"]["1"] == "ribs"  # JSON keys stay label values; the report names them
    report = (Path(results["stand_in"]["output_folder"]) / "evaluation.md").read_text()
    assert "Intensity per class" in report and "| ribs (1) |" in report
    assert "mean intensity: ribs (1) |" in report


def test_diversity_of_noise_is_high_and_identical_images_have_ms_ssim_one(results):
    from nnunet_diffaug.evaluation.diversity import choose_settings, pairwise_ms_ssim
    div = results["noise"]["diversity"]
    assert div["synthetic"]["mean"] < div["training"]["mean"]  # independent noise images share no structure
    rng = np.random.default_rng(0)
    smooth = np.cumsum(np.cumsum(rng.random((1, 4, 64, 64)), -1), -2)
    smooth = (smooth / smooth.max()).astype(np.float32)
    same = pairwise_ms_ssim([smooth] * 3, settings=choose_settings(smooth.shape[1:]))
    assert same["mean"] == pytest.approx(1.0, abs=1e-4) and same["pairs"] == 3


# ------------------------------------------------------------------------------------------------
# the background: the judge's false positives there, realism of mostly-background tiles
# ------------------------------------------------------------------------------------------------

def test_background_false_positive_share_counts_background_voxels_only_and_names_the_class():
    from nnunet_diffaug.evaluation.background import case_background_counts, share, summarise_false_positives
    label = np.zeros((4, 10, 10), np.uint8)
    label[0] = 1                                   # 100 foreground voxels (class 1), 300 background
    prediction = label.copy()
    prediction[1, 0, :7] = 2                       # 7 background voxels called class 2
    prediction[2, 0, :3] = 1                       # 3 called class 1
    prediction[0, :5] = 0                          # misses on foreground: not false positives on background
    prediction[0, 5:, :] = 2                       # foreground called another class: not background either
    a = case_background_counts(label, prediction, [1, 2])
    assert a == {"background_voxels": 300, "false_positive_voxels": 10, "per_class_voxels": {"1": 3, "2": 7}}
    assert share(a) == pytest.approx(10 / 300)
    b = case_background_counts(np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8), [1, 2])  # a clean case
    summary = summarise_false_positives({"a": a, "b": b}, [1, 2])
    assert summary["pooled_share"] == pytest.approx(10 / 400)             # over the set's background voxels
    assert summary["mean_case_share"] == pytest.approx((10 / 300 + 0) / 2)  # each case counts once
    assert summary["per_class"]["2"] == {"pooled_share": pytest.approx(7 / 400),
                                         "mean_case_share": pytest.approx(7 / 300 / 2)}
    assert summary["per_class"]["1"]["pooled_share"] == pytest.approx(3 / 400)
    assert summary["cases"] == 2 and summary["background_voxels"] == 400
    with pytest.raises(ValueError, match="one grid"):
        case_background_counts(label, prediction[:2], [1, 2])


def _tiler(patch):
    from types import SimpleNamespace
    from nnunet_diffaug.evaluation.nnunet_model import TrainedModel
    model = SimpleNamespace(patch_size=patch)
    model.tiles = lambda *a, **k: TrainedModel.tiles(model, *a, **k)
    return model, lambda seg, n: TrainedModel.tile_background_shares(model, seg, n)


def test_tiles_split_by_their_label_content_at_the_image_tiles_positions():
    from nnunet_diffaug.evaluation.background import BACKGROUND_TILE_SHARE, realism_by_content, split_by_content
    model, shares_of = _tiler((4, 32, 32))
    seg = np.zeros((1, 4, 32, 70), np.uint8)
    seg[..., :20] = 1                              # a structure on the left; tiles start at x = 0, 13, 25, 38
    shares = shares_of(seg, 100)
    assert shares == pytest.approx([12 / 32, 25 / 32, 1.0, 1.0])
    # the label tiles are the image tiles' positions: the same case as an image gives the same tiles
    image_tiles = model.tiles(seg.astype(np.float32), 100)
    assert [1 - t.mean() for t in image_tiles] == pytest.approx(list(shares))
    # an evenly spread subset (max_tiles) keeps the pairing
    assert shares_of(seg, 2) == pytest.approx([12 / 32, 1.0])
    features = np.arange(8.0).reshape(4, 2)
    mostly_background, content = split_by_content(features, shares)
    assert mostly_background.tolist() == features[2:].tolist() and content.tolist() == features[:2].tolist()
    assert BACKGROUND_TILE_SHARE == pytest.approx(0.9)
    # padding beyond a case smaller than the patch is not background: an all-background case stays at 1
    assert shares_of(np.zeros((1, 3, 20, 70), np.uint8), 100) == pytest.approx([1.0] * 4)
    small = np.zeros((1, 3, 20, 70), np.uint8)
    small[:, :, :2] = 1                            # 2 of 20 rows labelled: 0.9 background, a background tile
    assert shares_of(small, 1)[0] == pytest.approx(0.9) and shares_of(small, 1)[0] >= BACKGROUND_TILE_SHARE
    # 2d judges tile every axial slice
    assert len(_tiler((32, 32))[1](small, 100)) == 3 * 4

    # Fréchet distances per group; a group with fewer than 2 tiles of a set is missing, not an error
    rng = np.random.default_rng(0)
    feats = {k: rng.normal(size=(6, 3)) for k in ("synthetic", "training", "validation")}
    tile_shares = {"synthetic": np.array([1, 1, 1, 0, 0, 0.5]), "training": np.array([1, 1, 0, 0, 0, 0]),
                   "validation": np.array([0.95, 0, 0, 0, 0, 0])}
    split = realism_by_content(feats, tile_shares)
    assert split["background_tiles"]["tiles"] == {"synthetic": 3, "training": 2, "validation": 1}
    assert np.isnan(split["background_tiles"]["frechet_synthetic_vs_validation"])
    assert split["background_tiles"]["frechet_synthetic_vs_training"] >= 0
    assert split["content_tiles"]["tiles"] == {"synthetic": 3, "training": 4, "validation": 5}
    assert split["content_tiles"]["frechet_training_vs_validation"] >= 0


def test_background_metrics_are_reported_for_every_set(results):
    for name, r in results.items():
        fp = r["background"]["false_positives"]
        for k in ("synthetic", "training", "validation"):
            assert fp[k]["cases"] == len(r["cases"][k]) and fp[k]["background_voxels"] > 0, (name, k)
            assert 0 <= fp[k]["pooled_share"] <= 1 and 0 <= fp[k]["mean_case_share"] <= 1, (name, k)
            assert set(fp[k]["per_class"]) == set(r["class_names"])
            assert sum(c["pooled_share"] for c in fp[k]["per_class"].values()) == pytest.approx(fp[k]["pooled_share"])
        for cid, case in r["per_synthetic_case"].items():
            assert 0 <= case["background_false_positive_share"] <= 1, (name, cid)
        rea = r["background"]["realism"]
        for group in ("background_tiles", "content_tiles"):
            assert set(rea[group]) >= {"frechet_synthetic_vs_validation", "frechet_training_vs_validation", "tiles"}
        # every tile of the realism block is in exactly one group (in the example every tile holds labelled body:
        # the background group is empty and its distances null; the split itself is tested on handmade tiles)
        assert {k: rea["background_tiles"]["tiles"][k] + rea["content_tiles"]["tiles"][k]
                for k in ("synthetic", "training", "validation")} == r["realism"]["tiles"]
    # the reference does not depend on the synthetic set
    assert results["noise"]["background"]["false_positives"]["validation"] == \
        results["stand_in"]["background"]["false_positives"]["validation"]
    # noise painted over the real label maps: the judge calls much of its background foreground (measured: pooled
    # 0.48 against 0.035 on the validation cases); deformed real cases stay near the real value (0.037)
    fp = {name: r["background"]["false_positives"] for name, r in results.items()}
    assert fp["noise"]["synthetic"]["pooled_share"] > 5 * fp["noise"]["validation"]["pooled_share"]
    assert fp["stand_in"]["synthetic"]["pooled_share"] < 2 * fp["stand_in"]["validation"]["pooled_share"]
    report = (Path(results["stand_in"]["output_folder"]) / "evaluation.md").read_text()
    assert "## Background" in report and "mostly-background tiles" in report


# ------------------------------------------------------------------------------------------------
# a real synthesizer: trained vs untrained, judged by the same evaluation
# ------------------------------------------------------------------------------------------------

# the tiny preset cut to 30 + 20 steps: its images already follow the label maps about as well as after the
# preset's 300 + 400 (measured, soft-tissue Dice of the judge: 0.75-0.76 here, 0.82 after 300 + 400, 0.81 on the
# real validation cases)
BRIEFLY_TRAINED = {"base": "tiny", "autoencoder": {"steps": 30},
                   "diffusion": {"steps": 20, "scale_factor_batches": 2}, "checkpoint_every": 30, "montage_cases": 2}
# one step per stage (the diffusion step at 1/20 of the learning rate, in its warm-up): initial weights, in effect
UNTRAINED = {"base": "tiny", "autoencoder": {"steps": 1}, "diffusion": {"steps": 1, "scale_factor_batches": 1},
             "montage_cases": 2}


def _synthesize_with(config: dict, output_id: int, root, tmp_path):
    """Trains fold 0's 3D synthesizer with ``config`` (replacing the fold's earlier one) and writes 4 cases."""
    path = tmp_path / f"synthesizer_{output_id}.json"
    path.write_text(json.dumps(config))
    common = ["-d", EXAMPLE_NAME, "-f", "0", "-c", CONFIG, "-device", "cpu", "--seed", "0"]
    cli.train_synthesizer_entry(common + ["--preset", str(path), "--overwrite"])
    # the synthesizer's own painting is under test: no per-class calibration toward real intensities
    cli.synthesize_entry(common + ["-n", "4", "-o", str(output_id), "--sampler", "ddim", "--steps", "5",
                                   "--no-calibrate-intensity"])
    return root / "raw" / f"Dataset{output_id}_ChestCTSlabsSynthF0"


def test_a_trained_synthesizer_has_higher_label_fidelity_than_an_untrained_one(judge, tmp_path):
    root = judge[0]
    reports = {}
    for name, config, output_id in (("untrained", UNTRAINED, 941), ("trained", BRIEFLY_TRAINED, 942)):
        folder = _synthesize_with(config, output_id, root, tmp_path)
        inputs = resolve_inputs(EXAMPLE_NAME, 0, synthetic=str(folder), trainer=TRAINER, plans=PLANS,
                                configuration=CONFIG)
        reports[name] = evaluate(inputs, tmp_path / name, FAST)
    fidelity = {k: r["label_fidelity"] for k, r in reports.items()}
    dice = {k: v["synthetic"]["foreground_mean_dice"] for k, v in fidelity.items()}
    real = fidelity["trained"]["validation"]["foreground_mean_dice"]
    frechet = {k: r["realism"]["frechet_synthetic_vs_validation"] for k, r in reports.items()}
    print("label fidelity (foreground mean Dice):", dice, "judge on real validation cases:", real,
          "per class:", {k: v["synthetic"]["mean_dice_per_class"] for k, v in fidelity.items()},
          "Fréchet distance to the validation cases:", frechet)
    # measured over synthesizer seeds 0-3 on 2 cores (the tiny judge reads only soft tissue: 0.81 on real cases,
    # 0 on the other classes): trained 0.150-0.152, untrained 0.028-0.064, real validation 0.162
    assert dice["trained"] > dice["untrained"] + 0.25 * real
    assert dice["trained"] > 0.75 * real
    # realism agrees (measured: trained 20-23, untrained 77-148, training vs validation cases 11.7)
    assert frechet["trained"] < 0.5 * frechet["untrained"]


# ------------------------------------------------------------------------------------------------
# the console script: report files, nnU-Net's own validation reused, refusals
# ------------------------------------------------------------------------------------------------

def test_console_script_writes_the_report(judge, tmp_path, capsys):
    root, splits, sets = judge
    _entry(["-d", EXAMPLE_NAME, "-f", 0, "--synthetic", "921", "-tr", TRAINER, "-p", PLANS, "-c", CONFIG,
            "-device", "cpu", "--max-cases", 3])
    out = sets["stand_in"] / "diffaug_evaluation" / f"{TRAINER}__{PLANS}__{CONFIG}" / "fold_0"
    report = json.loads((out / "evaluation.json").read_text())
    # --max-cases 3: three of each set, and real cases only from the fold's own split
    assert {k: len(v) for k, v in report["cases"].items()} == {"synthetic": 3, "training": 3, "validation": 3}
    assert set(report["cases"]["training"]) <= set(splits[0]["train"])
    assert set(report["cases"]["validation"]) <= set(splits[0]["val"])
    # with test-time mirroring on, the real Dice is nnU-Net's own final validation, not recomputed
    assert report["label_fidelity"]["validation"]["source"].endswith("fold_0/validation/summary.json")
    assert sorted(p.name for p in (out / "predictions_synthetic").glob("*.nii.gz")) == \
        [f"{c}.nii.gz" for c in report["cases"]["synthetic"]]
    md = (out / "evaluation.md").read_text()
    assert "Which cases each metric uses" in md and "regularised" in md
    # background false positives: the real validation cases' predictions are nnU-Net's own, not segmented again;
    # the training cases are segmented here (label fidelity never needs them)
    fp = report["background"]["false_positives"]
    assert fp["validation"]["predictions"].startswith("nnU-Net's final validation predictions")
    assert not (out / "predictions_validation").exists()
    assert sorted(p.name for p in (out / "predictions_training").glob("*.nii.gz")) == \
        [f"{c}.nii.gz" for c in report["cases"]["training"]]
    assert all(0 <= fp[k]["pooled_share"] <= 1 for k in ("synthetic", "training", "validation"))
    assert "## Background" in md
    png = (out / "evaluation_montage.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Near-copies flagged" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# real-sized shapes: cases smaller than the judge's patch along some axes; reruns reuse segmentations
# ------------------------------------------------------------------------------------------------

def test_tiles_pad_a_case_smaller_than_the_patch_and_cover_a_larger_one():
    from types import SimpleNamespace
    from nnunet_diffaug.evaluation.nnunet_model import TrainedModel
    data = np.ones((1, 3, 20, 70), np.float32)     # smaller than the patch along z and y, larger along x
    tiles = TrainedModel.tiles(SimpleNamespace(patch_size=(4, 32, 32)), data, max_tiles=100)
    assert len(tiles) == 4                          # nnU-Net's sliding-window steps along x (70 -> 0, 13, 25, 38)
    for tile in tiles:
        assert tile.shape == (1, 4, 32, 32)
        assert tile.sum() == 3 * 20 * 32            # all of the case's voxels in view, the rest zero padding
        assert set(np.unique(tile)) == {0.0, 1.0}


def _cropped_set(raw, dataset_id, train, width):
    """Real training cases cropped in-plane to ``width`` voxels along one axis (narrower than the judge's patch)."""
    real = list_cases(raw / EXAMPLE_NAME)
    prov = SyntheticProvenance(source_dataset=EXAMPLE_NAME, fold=0, configuration=CONFIG,
                               training_cases=list(train), generator={"kind": "test probe: cropped real"}, seed=0)
    folder = raw / f"Dataset{dataset_id:03d}_CroppedSynthF0"
    writer = SyntheticDatasetWriter(folder, load_dataset_json(raw / EXAMPLE_NAME), prov)
    for i, source in enumerate(train[:3]):
        image, label = (sitk.ReadImage(real[source][k] if k == "label" else real[source][k][0])
                        for k in ("images", "label"))
        writer.write_case(f"crop_{i}", [image[:, 10:10 + width, :]], label[:, 10:10 + width, :],
                          {"source_case": source})
    writer.finalize()
    return folder


def test_cases_smaller_than_the_patch_are_evaluated_and_a_rerun_reuses_the_segmentations(judge, tmp_path,
                                                                                        monkeypatch):
    from nnunet_diffaug.evaluation.nnunet_model import TrainedModel
    root, splits, _ = judge
    folder = _cropped_set(root / "raw", 951, splits[0]["train"], width=20)
    try:
        inputs = resolve_inputs(EXAMPLE_NAME, 0, synthetic=str(folder), trainer=TRAINER, plans=PLANS,
                                configuration=CONFIG)
        patch = TrainedModel(inputs.model_folder, 0).patch_size
        shapes = [sitk.ReadImage(c["label"]).GetSize()[::-1] for c in inputs.synthetic_cases.values()]
        assert all(s[1] < patch[1] and s[2] > patch[2] for s in shapes), (shapes, patch)  # the shape mix
        first = evaluate(inputs, tmp_path / "eval", FAST)
        assert first["realism"]["frechet_synthetic_vs_validation"] >= 0
        assert 0 < first["label_fidelity"]["synthetic"]["foreground_mean_dice"] <= 1

        # a rerun (e.g. after a late failure) must not segment again: nothing it depends on changed
        def no_segmenting(*args, **kwargs):
            raise AssertionError("segmented again although a valid prediction exists")
        monkeypatch.setattr(TrainedModel, "segment", no_segmenting)
        again = evaluate(inputs, tmp_path / "eval", FAST)
        assert again["label_fidelity"]["synthetic"] == first["label_fidelity"]["synthetic"]
        # ...but a case whose image changed is segmented anew
        changed = inputs.synthetic_cases["crop_0"]["images"][0]
        os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
        with pytest.raises(AssertionError, match="segmented again"):
            evaluate(inputs, tmp_path / "eval", FAST)
    finally:
        shutil.rmtree(folder)


def _inpainted_set(raw, dataset_id, train, feather: bool, clip: tuple | None = None):
    """Real training cases with a box repainted at bone intensity and labelled spine: an inpainted set.
    ``clip``: outside the box, the source as CT normalisation clipped it (what diffaug_synthesize writes)."""
    from scipy import ndimage
    real = list_cases(raw / EXAMPLE_NAME)
    prov = SyntheticProvenance(source_dataset=EXAMPLE_NAME, fold=0, configuration=CONFIG, training_cases=list(train),
                               generator={"kind": "test probe", "label_mode": "inpaint"}, seed=0)
    folder = raw / f"Dataset{dataset_id:03d}_InpaintSynthF0"
    writer = SyntheticDatasetWriter(folder, load_dataset_json(raw / EXAMPLE_NAME), prov)
    for i, source in enumerate(train[:2]):
        image, label = sitk.ReadImage(real[source]["images"][0]), sitk.ReadImage(real[source]["label"])
        arr, lab = sitk.GetArrayFromImage(image).astype(np.float32), sitk.GetArrayFromImage(label)
        if clip is not None:
            arr = np.clip(arr, *clip)
        box = np.zeros(arr.shape, bool)
        box[:, 20:30, 20:30] = True
        weight = ndimage.gaussian_filter(box.astype(np.float32), (0, 2, 2)) if feather else box.astype(np.float32)
        weight[~ndimage.binary_dilation(box, iterations=3)] = 0  # exactly the source outside the region
        new = sitk.GetImageFromArray(arr * (1 - weight) + 300.0 * weight)
        new.CopyInformation(image)
        new_label = sitk.GetImageFromArray(np.where(box, 2, lab).astype(lab.dtype))
        new_label.CopyInformation(label)
        writer.write_case(f"inpaint_{i}", [new], new_label, {"source_case": source})
    writer.finalize()
    return folder


def test_inpainted_sets_report_the_repainted_share_the_seam_and_fidelity_inside_the_region(judge, tmp_path):
    root, splits, _ = judge
    properties = json.loads((root / "preprocessed" / EXAMPLE_NAME / f"{PLANS}.json").read_text())[
        "foreground_intensity_properties_per_channel"]["0"]
    ct_clip = (properties["percentile_00_5"], properties["percentile_99_5"])
    report = {}
    for dataset_id, feather, clip in ((952, False, None), (953, True, None), (954, False, ct_clip)):
        folder = _inpainted_set(root / "raw", dataset_id, splits[0]["train"], feather, clip)
        try:
            inputs = resolve_inputs(EXAMPLE_NAME, 0, synthetic=str(folder), trainer=TRAINER, plans=PLANS,
                                    configuration=CONFIG)
            report[dataset_id] = evaluate(inputs, tmp_path / str(dataset_id), FAST)["inpainting"]
        finally:
            shutil.rmtree(folder)
    hard, soft, clipped = report[952], report[953], report[954]
    assert hard["cases"] == 2 and hard["mean_changed_share"] == pytest.approx(100 / (64 * 64), rel=0.05)
    # air below the CT clipping range was written clipped, as diffaug_synthesize does: not a repainted voxel
    assert clipped["mean_changed_share"] == pytest.approx(hard["mean_changed_share"], rel=0.05)
    assert soft["mean_changed_share"] > hard["mean_changed_share"]  # the feathered margin is repainted too
    # a hard-edged box is a seam; the feathered blend joins the real image far more smoothly
    assert hard["mean_border_gradient_ratio"] > 2 * soft["mean_border_gradient_ratio"]
    assert 0 <= hard["mean_region_dice"] <= 1 and set(hard["per_case"]["inpaint_0"]["region_dice"]) >= {"2"}


def _refusal(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        _entry(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_refusals(judge, tmp_path, capsys):
    root, splits, sets = judge
    raw = root / "raw"
    base = ["-d", EXAMPLE_NAME, "-f", 0, "-tr", TRAINER, "-p", PLANS, "-c", CONFIG, "-device", "cpu"]

    assert "--synthetic 'Dataset999_Nothing' is neither a folder nor a dataset" in _refusal(
        base + ["--synthetic", "Dataset999_Nothing"], capsys)
    # three probe sets name fold 0: the user must choose
    err = _refusal(base, capsys)
    assert "Several synthetic datasets" in err and "Dataset921_StandInSynthF0" in err

    # a model folder without the fold's checkpoint
    fold1 = make_stand_in_synthetic_set(raw, EXAMPLE_NAME, 1, splits[1]["train"], 2, dataset_id=931)
    err = _refusal(["-d", EXAMPLE_NAME, "-f", 1, "-tr", TRAINER, "-p", PLANS, "-c", CONFIG], capsys)
    assert "fold_1/checkpoint_final.pth does not exist" in err
    assert "no synthetic" not in err.lower()
    shutil.rmtree(fold1)

    # labels that differ from the real dataset's
    bad = tmp_path / "Dataset932_BadLabels"
    shutil.copytree(sets["stand_in"], bad)
    dj = json.loads((bad / "dataset.json").read_text())
    dj["labels"] = {"background": 0, "something_else": 1}
    (bad / "dataset.json").write_text(json.dumps(dj))
    assert "differ from the real dataset's" in _refusal(base + ["--synthetic", bad], capsys)

    # a model trained with other labels
    model = root / "results" / EXAMPLE_NAME / f"{TRAINER}__{PLANS}__{CONFIG}"
    other = tmp_path / "other_model"
    shutil.copytree(model, other)
    (other / "dataset.json").write_text(json.dumps(dj))
    err = _refusal(base + ["--synthetic", "921", "--model", other], capsys)
    assert "the model's labels" in err and "differ" in err

    # a fold the splits do not have
    with pytest.raises(DiffAugError, match="fold 5 does not exist"):
        resolve_inputs(EXAMPLE_NAME, 5, synthetic="921", trainer=TRAINER, plans=PLANS, configuration=CONFIG)

    # a synthesizer that saw validation cases of the fold: the held-out reference would be contaminated
    leak_dir = tmp_path / "leaky"
    shutil.copytree(sets["copy"], leak_dir)
    prov = json.loads((leak_dir / "diffaug_provenance.json").read_text())
    prov["training_cases"] = prov["training_cases"] + [splits[0]["val"][0]]
    (leak_dir / "diffaug_provenance.json").write_text(json.dumps(prov))
    assert "would leak validation data" in _refusal(base + ["--synthetic", leak_dir], capsys)
