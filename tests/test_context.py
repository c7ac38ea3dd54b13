"""Context classes (a body envelope and intensity clusters where the labels say background), fitted and used for real.

Unit tests check the fitting on handmade arrays. The module's toy dataset is made to need context: a body of tissue
on air noise, an UNLABELLED dark "lung" at a random place inside it, and a small labelled bright disc. Only the
context can tell the painter where the lung is; one 2D synthesizer with context is trained for the module.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from support import (RecordingRunner, console_script, nnunet_env, nnunet_folders, run, toy_benchmark_dataset,
                     write_raw_dataset, write_splits)

from nnunet_diffaug import cli
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.paths import synthesizer_folder
from nnunet_diffaug.provenance import read_provenance
from nnunet_diffaug.raw_dataset import list_cases, load_dataset_json
from nnunet_diffaug.synthesis import context as ctx
from nnunet_diffaug.synthesis.config import SynthesizerConfig
from nnunet_diffaug.synthesis.data import DataSpec, FoldData, PatchSampler
from nnunet_diffaug.synthesis.synthesizer import Synthesizer

TOY_ID, TOY_NAME = 988, "Dataset988_ToyBodyLung"
AIR, LUNG, TISSUE, DISC = 10.0, 40.0, 100.0, 200.0
CONTEXT = {"body": True, "clusters": 2}


# ---------------------------------------------------------------------------------------------- fitting

def _disc(shape, centre, radius) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_body_mask_fills_the_lungs_and_drops_the_table_and_specks():
    body = _disc((48, 48), (22, 24), 15)
    lung = _disc((48, 48), (20, 20), 5)
    table = np.zeros((48, 48), bool)
    table[40:42, 4:44] = True                       # 2 voxels thick, 2 voxels below the body
    image = np.where(body & ~lung, 1.0, -1.0)
    image[table] = 1.0
    image[3, 3] = image[5, 40] = 1.0                # single bright voxels in the air
    mask = ctx.body_mask(np.stack([image, image]), 0.0, np.zeros((2, 48, 48), bool))
    assert np.array_equal(mask[0], body) and np.array_equal(mask[1], body)


def test_clusters_name_the_same_tissue_in_every_case_and_leave_labels_alone():
    rng = np.random.default_rng(0)
    cases = []
    for shift in (0, 12):                           # the regions sit elsewhere in the second case
        labels = np.zeros((1, 32, 32), np.uint8)
        image = np.full((1, 1, 32, 32), -1.0)
        image[0, 0, :, 10 + shift // 2:20 + shift // 2] = 0.5
        image[0, 0, 20:, :] = 2.0
        labels[0, 2:6, 2:6] = 1                     # a labelled structure on top of the -1 region
        cases.append((image + rng.normal(0, 0.01, image.shape), labels))
    model = ctx.fit_context(False, 3, -500.0, lambda: iter(cases), "ZScoreNormalization", None, 2, seed=0)
    centres = np.array(model.centres)[:, 0]
    assert centres == pytest.approx([-1.0, 0.5, 2.0], abs=0.15)          # sorted by intensity (smoothed borders)
    for image, labels in cases:
        context = model.case_context(image, labels, outside_class=2)
        assert np.all(context[labels == 1] == 0)                          # labelled voxels keep their label
        free = labels == 0
        smooth = ctx.smoothed(image, free)[0]
        expected = np.abs(smooth[..., None] - centres).argmin(-1) + 1
        assert np.array_equal(context[free], expected[free])
    image, labels = cases[0]
    merged = ctx.merge(labels, model.case_context(image, labels, outside_class=2), outside_class=2)
    assert set(np.unique(merged)) == {1, 3, 4, 5} and np.all(merged[labels == 1] == 1)


def test_too_many_clusters_for_the_unlabelled_voxels_are_refused():
    cases = [(np.zeros((1, 1, 2, 2)), np.ones((1, 2, 2), np.uint8))]   # every voxel labelled
    with pytest.raises(DiffAugError, match="3 intensity clusters asked for.*only 0 unlabelled"):
        ctx.fit_context(False, 3, -500.0, lambda: iter(cases), "ZScoreNormalization", None, 2, seed=0)


def test_ct_body_threshold_moves_above_nnunets_clipping_floor():
    dense = {"mean": -200.0, "std": 400.0, "percentile_00_5": -1000.0, "percentile_99_5": 600.0}
    model = ctx.fit_context(True, 0, -500.0, lambda: iter([]), "CTNormalization", dense, 2, seed=0)
    assert model.body_method == "ct_hu" and model.body_threshold == pytest.approx(-0.75)
    # only bone labelled: nnU-Net clips everything below +14 HU (air, lung, fat) to one floor value
    bones = {"mean": 245.0, "std": 138.0, "percentile_00_5": 14.0, "percentile_99_5": 830.0}
    model = ctx.fit_context(True, 0, -500.0, lambda: iter([]), "CTNormalization", bones, 2, seed=0)
    floor = (14.0 - 245.0) / 138.0
    assert model.body_method == "ct_above_clip_floor" and floor < model.body_threshold < floor + 0.1


def test_context_config_and_older_files():
    with pytest.raises(DiffAugError, match="context.clusters must be in"):
        SynthesizerConfig.from_json({"base": "tiny", "context": {"clusters": 99}})
    assert not SynthesizerConfig.from_json({"base": "tiny"}).context.enabled   # older configs: off
    spec = dict(dataset_name="D", configuration="2d", plans_identifier="P", fold=0, training_cases=["a"],
                spatial_dims=2, in_channels=1, label_values=[0, 1], normalization_schemes=["CTNormalization"],
                intensity_min=[-1.0], intensity_max=[1.0], patch_size=[64, 64])
    old = DataSpec.from_json(spec, "synthesizer.json")   # written before context: still loads and resumes
    assert old.num_classes == 3 and "context" not in old.to_json()
    model = ctx.ContextModel(True, 0.0, "otsu", [[0.0], [1.0]])
    new = DataSpec.from_json({**spec, "context": model.to_json()}, "synthesizer.json")
    assert new.num_classes == 5 and new.outside_class == 2 and new.context_model == model


# ---------------------------------------------------------------------------------------------- toy dataset

def _toy_case(rng: np.random.Generator, size: int = 64, slices: int = 4):
    body = _disc((size, size), (32 + rng.integers(-2, 3), 32 + rng.integers(-2, 3)), int(rng.integers(24, 28)))
    while True:  # an unlabelled lung and a labelled disc, apart, inside the body
        lung = _disc((size, size), rng.integers(18, 46, 2), int(rng.integers(7, 10)))
        disc = _disc((size, size), rng.integers(18, 46, 2), 5)
        if not (lung & disc).any() and not (_disc((size, size), (32, 32), 30) < (lung | disc)).any() \
                and not (lung & ~body).any() and not (disc & ~body).any():
            break
    image = np.where(disc, DISC, np.where(lung, LUNG, np.where(body, TISSUE, AIR)))
    image = image[None].repeat(slices, 0) + rng.normal(0, 5, (slices, size, size))   # no exact zeros: no crop
    return image.astype(np.float32), disc.astype(np.uint8)[None].repeat(slices, 0), lung


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_context")
    rng = np.random.default_rng(0)
    cases = {f"toy_{i:03d}": (*_toy_case(rng)[:2], (1.0, 1.0, 3.0)) for i in range(8)}
    write_raw_dataset(root / "raw" / TOY_NAME, cases, "MR", {"background": 0, "disc": 1})
    run([console_script("nnUNetv2_plan_and_preprocess"), "-d", str(TOY_ID), "-c", "2d", "-np", "1", "-npfp", "1"],
        nnunet_env(root))
    write_splits(root / "preprocessed" / TOY_NAME, [f"toy_{i:03d}" for i in range(8)])
    with nnunet_folders(root):
        yield root


def test_fold_data_carries_the_context_in_volumes_and_crops_alike(toy_root):
    data = FoldData(TOY_ID, "2d", 0)
    config = SynthesizerConfig.from_json({"base": "tiny", "context": CONTEXT})
    from nnunet_diffaug.synthesis.training import fit_fold_context
    model = fit_fold_context(data, config, seed=0)
    assert model.body_method == "otsu" and len(model.centres) == 2
    declared = {c: data.declared_label_volume(c) for c in data.training_cases}
    data.use_context(model)
    lung_class, tissue_class = data.outside_class + 1, data.outside_class + 2
    for case_id in data.training_cases:
        labels = data.label_volume(case_id)
        assert np.array_equal(labels[declared[case_id] > 0], declared[case_id][declared[case_id] > 0])
        image = np.asarray(data.case(case_id)[0][0])
        # the context says what the image shows: the lung cluster is dark, the tissue cluster bright, air outside
        assert image[labels == lung_class].mean() < image[labels == tissue_class].mean() - 1.0
        assert (labels == lung_class).sum() >= 4 * 7 * 7 * 3 and image[labels == 0].mean() < image[labels == lung_class].mean()
    sampler = PatchSampler(data, [32, 32], 0.5)
    rng = np.random.default_rng(1)
    for _ in range(5):  # a crop's labels are the crop of the volume's (the crop path reads the cache by region)
        image, labels, case_id = sampler.sample(rng)
        volume = data.label_volume(case_id)
        found = [z for z in range(volume.shape[0]) for y in range(volume.shape[1] - 31) for x in range(volume.shape[2] - 31)
                 if np.array_equal(volume[z, y:y + 32, x:x + 32], labels[0])
                 and np.allclose(np.asarray(data.case(case_id)[0][0, z, y:y + 32, x:x + 32]), image[0])]
        assert found
    cache = data.context.folder
    assert sorted(p.stem for p in cache.glob("*.npy")) == sorted(data.training_cases)
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    again = FoldData(TOY_ID, "2d", 0)
    again.use_context(model)
    assert np.array_equal(again.label_volume(data.training_cases[0]), data.label_volume(data.training_cases[0]))
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == stamps   # read, not recomputed


@pytest.fixture(scope="module")
def trained_with_context(toy_root):
    config = toy_root / "context.json"
    config.write_text(json.dumps({"base": "tiny", "context": CONTEXT,
                                  "label_generator": {"enabled": True, "autoencoder_steps": 20, "steps": 20,
                                                      "max_shape_2d": [64, 64]}}))
    cli.train_synthesizer_entry(["-d", str(TOY_ID), "-f", "0", "-c", "2d", "--preset", str(config), "-device", "cpu",
                                 "--seed", "0"])
    return Synthesizer.load(synthesizer_folder(TOY_NAME, "2d", 0), torch.device("cpu"))


def test_the_painter_paints_the_lung_where_only_the_context_says_it_is(trained_with_context):
    syn = trained_with_context
    data = FoldData(TOY_ID, "2d", 1)     # fold 0's validation cases: lungs at places the synthesizer never saw
    data.use_context(syn.spec.context_model)
    labels = np.stack([data.label_volume(c)[0] for c in data.training_cases])
    lung_class, tissue_class = data.outside_class + 1, data.outside_class + 2
    lung, tissue = labels == lung_class, labels == tissue_class
    smp = syn.sampler("dpmpp", 10)
    painted = syn.generate(labels, smp, torch.Generator().manual_seed(0))[:, 0]
    told_tissue = np.where(lung, tissue_class, labels)          # the same maps with the lung called tissue
    repainted = syn.generate(told_tissue, smp, torch.Generator().manual_seed(0))[:, 0]
    real = np.stack([np.asarray(data.case(c)[0][0, 0]) for c in data.training_cases])
    real_contrast = np.array([r[t].mean() - r[lu].mean() for r, t, lu in zip(real, tissue, lung)])
    contrast = np.array([p[t].mean() - p[lu].mean() for p, t, lu in zip(painted, tissue, lung)])
    gone = np.array([p[t].mean() - p[lu].mean() for p, t, lu in zip(repainted, tissue, lung)])
    # measured: real contrast 1.3-1.4, painted with the context 0.9-1.2, with the lung called tissue 0.0-0.1
    assert np.all(real_contrast > 1.0)
    assert np.all(contrast > 0.5 * real_contrast)
    assert np.all(gone < 0.3 * contrast)


def _synthesize(output_id: int, labels: str = "real", num_cases: int = 2) -> Path:
    from nnunet_diffaug.synthesis.synthesize import synthesize
    return synthesize(TOY_ID, "2d", 0, num_cases=num_cases, labels=labels, output_id=output_id, steps=3,
                      device="cpu", progress=False)


def test_synthetic_sets_hold_only_the_declared_labels_and_record_the_context(trained_with_context):
    syn = trained_with_context
    for output_id, labels in ((961, "real"), (962, "generated"), (963, "real-aligned")):
        out = _synthesize(output_id, labels)
        for case in list_cases(out, load_dataset_json(out)).values():
            assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(case["label"])))) <= {0, 1}
        recorded = read_provenance(out).generator["context"]
        assert recorded["key"] == syn.spec.context_model.key() and recorded["centres"] == syn.spec.context["centres"]
        records = [json.loads(p.read_text()) for p in sorted(out.glob("diffaug_cases/*.json"))]
        assert records and all(r["context"] == recorded["key"] for r in records)


def test_a_synthesizer_trained_with_context_refuses_to_sample_without_it(trained_with_context, toy_root):
    folder = synthesizer_folder(TOY_NAME, "2d", 0)
    run_file = folder / "synthesizer.json"
    saved = run_file.read_text()
    run = json.loads(saved)
    del run["spec"]["context"]
    run_file.write_text(json.dumps(run))
    try:
        with pytest.raises(DiffAugError, match=r"synthesizer.json.*context"):
            _synthesize(964)
        assert not list((toy_root / "raw").glob("Dataset964_*"))
    finally:
        run_file.write_text(saved)


def test_the_context_arm_trains_its_own_synthesizer_from_the_preset_with_context(tmp_path, monkeypatch):
    from nnunet_diffaug.benchmark import BenchmarkSettings, builtin_arm, run_benchmark
    from nnunet_diffaug.benchmark.arms import CONTEXT as ARM_CONTEXT
    arm = builtin_arm("diffaug_r33_auto_context")
    assert arm.synthetic.context and arm.synthetic.key != builtin_arm("diffaug_r33_auto").synthetic.key
    assert dict(arm.env) == dict(builtin_arm("diffaug_r33_auto").env)
    assert builtin_arm("randomised_r33_context") is None
    dataset = toy_benchmark_dataset(tmp_path, monkeypatch)
    user_cache = tmp_path / "user_preprocessed" / dataset / "diffaug_context"
    user_cache.mkdir()  # the user's own context maps (other splits): never linked into the workspace
    s = BenchmarkSettings(dataset=dataset, train_sizes=(2,), seeds=(0,), epochs=1, iterations=1,
                          test_cases=("toy_000", "toy_001", "toy_002"),
                          arms=("diffaug_r33_auto", "diffaug_r33_auto_context"))
    runner = RecordingRunner()
    run_benchmark(s, tmp_path / "ws", runner=runner)
    assert not (tmp_path / "ws" / "preprocessed" / dataset / "diffaug_context").exists()
    trained = {Path(env["nnUNet_results"]).name: cmd for name, cmd, env in runner.calls
               if name == "diffaug_train_synthesizer"}
    assert sorted(trained) == ["synthesizer", "synthesizer_context"]
    assert trained["synthesizer"][trained["synthesizer"].index("--preset") + 1] == "tiny"
    preset = Path(trained["synthesizer_context"][trained["synthesizer_context"].index("--preset") + 1])
    written = SynthesizerConfig.from_json(json.loads(preset.read_text()))
    assert written.context.body == ARM_CONTEXT["body"] and written.context.clusters == ARM_CONTEXT["clusters"]
    assert dataclass_without_context(written) == dataclass_without_context(SynthesizerConfig.from_json({"base": "tiny"}))
    sets = {Path(env["nnUNet_results"]).name: env["DIFFAUG_SYNTHETIC_DATASET"]
            for name, _, env in runner.calls if name == "nnUNetv2_train" and "DIFFAUG_SYNTHETIC_DATASET" in env}
    assert sets["diffaug_r33_auto_context"] != sets["diffaug_r33_auto"]


def dataclass_without_context(config: SynthesizerConfig) -> dict:
    return {k: v for k, v in config.to_json().items() if k != "context"}
