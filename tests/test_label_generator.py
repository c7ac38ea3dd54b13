"""Label generator: trained on the real chest CT's fold-0 label maps (tiny, CPU), then asked for maps.

One 2D synthesizer with a label generator is trained once for the module (image stages kept short:
only the label side is judged here); a short 3D run checks the same code path in 3D.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from support import EXAMPLE_ID, EXAMPLE_NAME, nnunet_folders, private_copy_of_example, trainer_accepts

from nnunet_diffaug import cli
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.paths import synthesizer_folder
from nnunet_diffaug.provenance import read_provenance
from nnunet_diffaug.synthesis.checkpoint import final_file, load_checkpoint, read_state, unprefixed
from nnunet_diffaug.synthesis.config import load_config
from nnunet_diffaug.synthesis.data import FoldData
from nnunet_diffaug.synthesis.ema import ema_weights
from nnunet_diffaug.synthesis.label_attributes import (component_counts, parse_volume_requests,
                                                       remove_small_fragments, volume_fractions)
from nnunet_diffaug.synthesis.label_generator import LabelGenerator
from nnunet_diffaug.synthesis.label_training import TrainingLabelMaps
from nnunet_diffaug.synthesis.label_map_sampler import LabelMapSampler

pytestmark = pytest.mark.slow

LABELS = {"background": 0, "ribs": 1, "spine": 2, "right_lung": 3, "left_lung": 4, "soft_tissue": 5}
CONFIG_2D = {"base": "tiny", "autoencoder": {"steps": 30}, "diffusion": {"steps": 30, "scale_factor_batches": 2},
             "montage_cases": 2, "label_generator": {"enabled": True, "autoencoder_steps": 150, "steps": 300,
                                                     "scale_factor_batches": 4}}
CONFIG_3D = {"base": "tiny", "autoencoder": {"steps": 10}, "diffusion": {"steps": 10, "scale_factor_batches": 2},
             "montage_cases": 2, "label_generator": {"enabled": True, "autoencoder_steps": 20, "steps": 20,
                                                     "scale_factor_batches": 2, "sampling_steps": 5,
                                                     "ema_decay": 0.8}}


@pytest.fixture(scope="module")
def root(planned_example, tmp_path_factory):
    """A private copy of the planned example (raw + preprocessed), with nnU-Net's env pointing at it."""
    with nnunet_folders(private_copy_of_example(planned_example[0], tmp_path_factory.mktemp("labelgen"))) as dst:
        yield dst


def _train(root: Path, configuration: str, config: dict) -> Path:
    path = root / f"labelgen_{configuration}.json"
    path.write_text(json.dumps(config))
    cli.train_synthesizer_entry(["-d", str(EXAMPLE_ID), "-f", "0", "-c", configuration, "--preset", str(path),
                                 "-device", "cpu"])
    return synthesizer_folder(EXAMPLE_NAME, configuration, 0)


@pytest.fixture(scope="module")
def trained_2d(root):
    return _train(root, "2d", CONFIG_2D)


def _generator(folder: Path) -> LabelGenerator:
    cfg = load_config(str(folder / "config.json"))
    spec = json.loads((folder / "synthesizer.json").read_text())["spec"]
    return LabelGenerator.load(folder, cfg.label_generator, spec["spatial_dims"], len(spec["label_values"]) + 1,
                               len(spec["label_values"]) - 1, torch.device("cpu"))


def _real_maps(configuration: str, gen: LabelGenerator) -> list[np.ndarray]:
    data = FoldData(EXAMPLE_ID, configuration, 0)
    cfg = load_config("tiny")
    cfg = dataclasses.replace(cfg, label_generator=gen.cfg)
    spec = type("Spec", (), {"spatial_dims": data.spatial_dims, "num_classes": gen.num_classes,
                             "outside_class": data.outside_class, "label_values": data.label_values})()
    sampler = TrainingLabelMaps(data, spec, cfg)
    return [sampler._fit(m, None) for m in sampler.maps]


def _stats(maps: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    return (np.mean([volume_fractions(m, k) for m in maps], 0), np.mean([component_counts(m, k) for m in maps], 0))


# ---------------------------------------------------------------------------------------------- training

def test_label_stages_train_with_curves_and_montages(trained_2d):
    for stage, key in (("label_autoencoder", "ce"), ("label_diffusion", "mse")):
        losses = read_state(trained_2d / f"{stage}.safetensors")["losses"][key]
        assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20]), stage
        assert (trained_2d / f"{stage}_losses.png").is_file() and (trained_2d / f"{stage}_montage.png").is_file()
    assert not list(trained_2d.glob("*_checkpoint.safetensors"))


def test_trained_generator_is_closer_to_real_label_statistics_than_untrained(trained_2d):
    gen = _generator(trained_2d)
    untrained = LabelGenerator(gen.cfg, gen.spatial_dims, gen.num_classes, gen.num_attributes, torch.device("cpu"))
    untrained.state = dict(gen.state)
    k = gen.num_attributes
    real_f, real_c = _stats(_real_maps("2d", gen), k)
    dist = {}
    for name, g in (("trained", gen), ("untrained", untrained)):
        maps = list(g.sample(None, 32, 1.0, g.sampler(), torch.Generator().manual_seed(0)))
        assert set(np.unique(maps).tolist()) <= set(range(gen.num_classes))  # declared classes only
        f, c = _stats(maps, k)
        dist[name] = (float(np.abs(f - real_f).sum()), float(np.abs(np.log1p(c) - np.log1p(real_c)).mean()))
    print("L1 of mean volume fractions, mean |log(1+components)| difference to real:", dist)
    # measured: trained (0.03, 0.9), untrained (0.7, 3.5)
    assert dist["trained"][0] < 0.4 * dist["untrained"][0]
    assert dist["trained"][1] < 0.5 * dist["untrained"][1]


def test_larger_requested_volume_gives_larger_volume_and_guidance_strengthens_it(trained_2d):
    gen = _generator(trained_2d)
    k = LABELS["soft_tissue"]
    train = gen.training_attributes
    low, high = np.quantile(train[:, k - 1], [0.1, 0.9])
    rng = np.random.default_rng(0)
    base = train[rng.integers(len(train), size=48)]
    response = {}
    for w in (1.0, 3.0):
        got = {}
        for name, value in (("low", low), ("high", high)):
            attrs = base.copy()
            attrs[:, k - 1] = value
            maps = gen.sample(attrs, len(attrs), w, gen.sampler(), torch.Generator().manual_seed(1))
            got[name] = float(np.mean([volume_fractions(m, gen.num_attributes)[k - 1] for m in maps]))
        response[w] = got["high"] - got["low"]
        print(f"w={w}: asked {low:.3f} -> {got['low']:.3f}, asked {high:.3f} -> {got['high']:.3f}")
    # measured: response 0.08 at w=1, 0.13 at w=3 (asked 0.17 vs 0.48)
    assert response[1.0] > 0.02
    assert response[3.0] > response[1.0]


# ---------------------------------------------------------------------------------------------- synthesis

def _label_array(folder: Path, case_id: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case_id}.nii.gz")))


def test_generated_labels_mode_writes_a_dataset_thetrainer_accepts(trained_2d, root):
    cli.synthesize_entry(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "2d", "-n", "3", "-o", "940", "--labels",
                          "generated", "--volume", "soft_tissue=0.35:0.45", "2=0.01:0.02", "--guidance", "2",
                          "-device", "cpu"])
    out = root / "raw" / "Dataset940_ChestCTSlabsSynthF0"
    assert len(trainer_accepts(out, "2d", root)) == 3
    lg = read_provenance(out).generator["label_generator"]
    assert lg["guidance"] == 2.0 and {r["class"] for r in lg["volume_requests"]} == {"soft_tissue", "spine"}
    for i in range(3):
        record = json.loads((out / "diffaug_cases" / f"synth_{i:05d}.json").read_text())
        assert record["label_mode"] == "generated" and record["guidance"] == 2.0
        assert 0.35 <= record["condition_fractions"]["soft_tissue"] <= 0.45
        assert set(record["measured_fractions"]) == set(LABELS) - {"background"}
        assert set(np.unique(_label_array(out, f"synth_{i:05d}")).tolist()) <= set(LABELS.values())


def test_real_aligned_mode_paints_each_training_case_on_its_own_grid(trained_2d, root):
    cli.synthesize_entry(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "2d", "-n", "5", "-o", "941", "--labels",
                          "real-aligned", "-device", "cpu"])
    out = root / "raw" / "Dataset941_ChestCTSlabsSynthF0"
    trainer_accepts(out, "2d", root)
    data = FoldData(EXAMPLE_ID, "2d", 0)
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    pre_synth = nnUNetDatasetBlosc2(str(root / "tmp_pre" / out.name))
    for i in range(5):
        record = json.loads((out / "diffaug_cases" / f"synth_{i:05d}.json").read_text())
        source = data.training_cases[i % len(data.training_cases)]
        assert record["aligned_with_source"] is True and record["source_case"] == source
        real_raw = sitk.ReadImage(str(root / "raw" / EXAMPLE_NAME / "labelsTr" / f"{source}.nii.gz"))
        synth_raw = sitk.ReadImage(str(out / "labelsTr" / f"synth_{i:05d}.nii.gz"))
        assert synth_raw.GetSize() == real_raw.GetSize()  # a full volume, not one slice
        assert np.array_equal(sitk.GetArrayFromImage(synth_raw), sitk.GetArrayFromImage(real_raw))
        # what the trainer pairs: the same preprocessed shape and label map as the real case
        real_data, real_seg, _ = data.case(source)
        synth_data, synth_seg, _, _ = pre_synth.load_case(f"synth_{i:05d}")
        assert synth_data.shape == real_data.shape
        assert np.array_equal(np.asarray(synth_seg[...]), np.asarray(real_seg[...]))


def test_bad_label_requests_are_refused(trained_2d, root):
    names = {k: v for k, v in LABELS.items()}
    values = sorted(LABELS.values())
    for spec, words in (("lungs=0:0.1", "unknown class 'lungs'"), ("spine=0.3:0.1", "greater than HIGH"),
                        ("spine=0:1.5", "must lie in [0, 1]"), ("spine:0.1", "expected CLASS=LOW:HIGH"),
                        ("background=0:0.5", "background")):
        with pytest.raises(DiffAugError, match="--volume") as e:
            parse_volume_requests([spec], names, values)
        assert words in str(e.value)
    assert parse_volume_requests(["3=0.1:0.2"], names, values)[0].label_name == "right_lung"
    with pytest.raises(DiffAugError, match="apply to --labels generated only"):
        cli.synthesize_entry.__wrapped__(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "2d", "-n", "1", "--volume",
                                          "spine=0:0.1"])
    cfg = load_config(str(trained_2d / "config.json")).label_generator
    with pytest.raises(DiffAugError, match="trained without a label generator.*diffaug_train_synthesizer"):
        LabelGenerator.load(trained_2d, dataclasses.replace(cfg, enabled=False), 2, 7, 5, torch.device("cpu"))


def test_fragment_removal_relabels_only_small_pieces():
    m = np.zeros((12, 12), dtype=np.uint8)
    m[2:8, 2:8] = 3
    m[10, 10] = 3          # a 1-voxel speck in background
    m[4, 4] = 1            # a 1-voxel speck inside class 3
    out = remove_small_fragments(m, 3, range(1, 6))
    assert out[10, 10] == 0 and out[4, 4] == 3 and (out == 3).sum() == 36


class _MapOnlyGenerator:
    """Stands in for a trained label generator: 2 declared classes, 'outside' (3), context classes 4 and 5."""
    num_attributes, num_classes, canvas = 2, 6, (12, 12)
    training_attributes = np.full((1, 2), 0.1)

    def sampler(self, name):
        return None

    def sample(self, attrs, n, guidance, sampler, gen):
        m = np.full((12, 12), 4, dtype=np.uint8)   # body envelope everywhere
        m[2:6, 2:6] = 1
        m[8, 8] = 5                                  # a speck of a context cluster inside the body
        m[8, 2] = 2                                  # a speck of a declared class
        m[0, 11] = 3                                 # 'outside' at the canvas edge: padding, left alone
        return m[None]


def test_generated_maps_lose_specks_of_context_classes_too_but_keep_the_outside_class():
    sampler = LabelMapSampler(_MapOnlyGenerator(), [], 1.0, 3, ["spine", "ribs"])
    clean, record = sampler.make(np.random.default_rng(0))
    clean = np.asarray(clean)
    assert clean[8, 8] == 4 and clean[8, 2] == 4 and clean[0, 11] == 3
    assert (clean == 1).sum() == 16 and record["fragment_voxels_relabelled"] == 2


# ---------------------------------------------------------------------------------------------- 3D

def test_3d_label_generator_trains_and_both_new_modes_write_3d_cases(root):
    folder = _train(root, "3d_fullres", CONFIG_3D)
    gen = _generator(folder)
    assert gen.spatial_dims == 3 and len(gen.canvas) == 3
    # the label diffusion keeps an EMA of its weights beside the raw ones, and the loaded generator samples with it
    tensors, _ = load_checkpoint(final_file(folder, "label_diffusion"), torch.device("cpu"))
    ema, raw = ema_weights(tensors), unprefixed("label_model", tensors)
    assert ema is not None and set(ema) == set(raw)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    assert all(torch.equal(v, ema[k]) for k, v in gen.model.state_dict().items())
    cli.synthesize_entry(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "3d_fullres", "-n", "2", "-o", "942",
                          "--labels", "generated", "--volume", "right_lung=0.05:0.1", "--steps", "3",
                          "-device", "cpu"])
    out = root / "raw" / "Dataset942_ChestCTSlabsSynthF0"
    trainer_accepts(out, "3d_fullres", root)
    assert _label_array(out, "synth_00000").shape == tuple(gen.canvas)
    cli.synthesize_entry(["-d", str(EXAMPLE_ID), "-f", "0", "-c", "3d_fullres", "-n", "1", "-o", "943",
                          "--labels", "real-aligned", "--steps", "3", "-device", "cpu"])
    aligned = root / "raw" / "Dataset943_ChestCTSlabsSynthF0"
    trainer_accepts(aligned, "3d_fullres", root)
    source = json.loads((aligned / "diffaug_cases" / "synth_00000.json").read_text())["source_case"]
    real = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "raw" / EXAMPLE_NAME / "labelsTr" / f"{source}.nii.gz")))
    assert np.array_equal(_label_array(aligned, "synth_00000"), real)


def test_label_stages_stopped_mid_stage_resume_to_the_same_result(root):
    """Stopped inside the label autoencoder (checkpoint at step 15 of 20), rerun, the label stages end exactly
    as an uninterrupted run does: same loss history, same weights (every step seeds its own randomness)."""
    from nnunet_diffaug.synthesis.training import train_synthesizer
    config = load_config("tiny")
    config = dataclasses.replace(
        config, checkpoint_every=5, montage_cases=1,
        autoencoder=dataclasses.replace(config.autoencoder, steps=5),
        diffusion=dataclasses.replace(config.diffusion, steps=5, scale_factor_batches=1),
        label_generator=dataclasses.replace(config.label_generator, enabled=True, autoencoder_steps=20, steps=10,
                                            scale_factor_batches=1, sampling_steps=3))
    args = dict(dataset=EXAMPLE_ID, configuration="2d", fold=1, config=config, device="cpu", progress=False)
    folder = train_synthesizer(**args, stop_after=15)
    assert not (folder / "label_autoencoder.safetensors").exists()
    assert read_state(folder / "label_autoencoder_checkpoint.safetensors")["step"] == 15
    train_synthesizer(**args)
    assert "label_autoencoder: resuming from step 15 of 20" in (folder / "training_log.txt").read_text()
    resumed = {s: (folder / f"{s}.safetensors").read_bytes() for s in ("label_autoencoder", "label_diffusion")}
    resumed_losses = {s: read_state(folder / f"{s}.safetensors")["losses"] for s in resumed}

    train_synthesizer(**args, overwrite=True)  # the same run, uninterrupted
    for stage in resumed:
        assert read_state(folder / f"{stage}.safetensors")["losses"] == resumed_losses[stage]
        assert (folder / f"{stage}.safetensors").read_bytes() == resumed[stage]
