"""``--labels inpaint``: a real case kept, one structure edited, only the region around it repainted.

Toy CT cases: a bright lesion disc (class 2, ~220 HU) inside a large organ square (class 1, ~100 HU) on
a dark background. One tiny 2D synthesizer is trained for the module (about a minute on 2 cores); the
edit and sampler units need no trained model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from support import console_script, nnunet_env, nnunet_folders, run, write_raw_dataset, write_splits

from nnunet_diffaug import cli
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.provenance import read_provenance
from nnunet_diffaug.raw_dataset import list_cases, load_dataset_json
from nnunet_diffaug.synthesis.config import DDPM_SAMPLERS, DiffusionConfig
from nnunet_diffaug.synthesis.data import FoldData
from nnunet_diffaug.synthesis.image_generator import build_train_scheduler
from nnunet_diffaug.synthesis.inpainting import InpaintLabels, feather, parse_inpaint_settings
from nnunet_diffaug.synthesis.aligned_volumes import aligned_raw_space
from nnunet_diffaug.synthesis.sampling import Sampler, sample_latents_inpaint

TOY_ID, TOY_NAME = 993, "Dataset993_ToyLesions"
LABELS = {"background": 0, "organ": 1, "lesion": 2}
HU = {0: -50.0, 1: 100.0, 2: 220.0}


def _toy_case(rng: np.random.Generator, size: int = 64, slices: int = 4):
    yy, xx = np.mgrid[:size, :size]
    label = np.zeros((size, size), np.uint8)
    label[8:56, 8:56] = 1
    cy, cx = rng.integers(18, 46, 2)
    label[(yy - cy) ** 2 + (xx - cx) ** 2 <= int(rng.integers(5, 8)) ** 2] = 2
    image = np.vectorize(HU.get)(label).astype(np.float32)[None].repeat(slices, 0)
    return image + rng.normal(0, 8, image.shape).astype(np.float32), label[None].repeat(slices, 0)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint")
    rng = np.random.default_rng(0)
    write_raw_dataset(root / "raw" / TOY_NAME, {f"toy_{i:03d}": (*_toy_case(rng), (1.0, 1.0, 3.0)) for i in range(8)},
                      "CT", LABELS)
    run([console_script("nnUNetv2_plan_and_preprocess"), "-d", str(TOY_ID), "-c", "2d", "-np", "1", "-npfp", "1"],
        nnunet_env(root))
    write_splits(root / "preprocessed" / TOY_NAME, [f"toy_{i:03d}" for i in range(8)])
    with nnunet_folders(root):
        yield root


@pytest.fixture(scope="module")
def trained(toy_root):
    config = toy_root / "short.json"  # the tiny preset, shortened: the toy's classes differ by 120 HU
    config.write_text(json.dumps({"base": "tiny", "autoencoder": {"steps": 200}, "diffusion": {"steps": 300}}))
    cli.train_synthesizer_entry(["-d", str(TOY_ID), "-f", "0", "-c", "2d", "--preset", str(config), "-device", "cpu",
                                 "--seed", "0"])
    return toy_root


def _synthesize(output_id: int, *extra: str) -> Path:
    # how the model repaints is under test: without the per-class calibration that would mask it
    cli.synthesize_entry(["-d", str(TOY_ID), "-f", "0", "-c", "2d", "-n", "3", "--labels", "inpaint", "-device", "cpu",
                          "--steps", "10", "--seed", "0", "-o", str(output_id), "--no-calibrate-intensity", *extra])
    (folder,) = (Path(p) for p in (Path(os.environ["nnUNet_raw"])).glob(f"Dataset{output_id}_*"))
    return folder


def _cases(folder: Path):
    """(record, image, label) per case, arrays in raw axis order."""
    out = []
    for case_id, c in sorted(list_cases(folder, load_dataset_json(folder)).items()):
        record = json.loads((folder / "diffaug_cases" / f"{case_id}.json").read_text())
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(c["images"][0])))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(c["label"])))
        out.append((record, image, label))
    return out


def _source_in_raw_units(data: FoldData, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The source case as the writer would write it unedited: (image, label), raw axis order."""
    image = np.asarray(data.case(case_id)[0][...], dtype=np.float32)
    channels, label, _ = aligned_raw_space(data, case_id).convert(image, data.label_volume(case_id))
    return sitk.GetArrayFromImage(channels[0]), sitk.GetArrayFromImage(label)


def test_moved_lesion_is_painted_as_lesion_and_everything_outside_the_region_is_the_real_case(trained):
    out = _synthesize(960, "--classes", "lesion", "--edit", "move", "--host", "organ", "--margin", "3")
    provenance = read_provenance(out)
    assert provenance.generator["label_mode"] == "inpaint"
    assert provenance.generator["inpaint"]["edits"] == ["move"] and provenance.generator["inpaint"]["host"] == "organ"
    data = FoldData(TOY_ID, "2d", 0)
    gains = []
    for record, image, label in _cases(out):
        edit = record["inpaint"]
        assert record["label_mode"] == "inpaint" and edit["edit"] == "move" and edit["class"] == "lesion"
        assert record["aligned_with_source"] is False  # moved labels: PatchMix must not pair it with its source
        assert record["sampler"] == "dpmpp" and record["steps"] == 10 and record["resample_jumps"] == 1
        src_image, src_label = _source_in_raw_units(data, record["source_case"])
        assert image.shape == src_image.shape
        changed = image != src_image
        # outside the repaint region every voxel is the real case's, bit for bit (float32 on both sides)
        assert 0 < changed.sum() <= edit["repaint_voxels"]
        box = tuple(slice(a, b) for a, b in edit["repaint_bbox"])
        outside_box = np.ones(changed.shape, bool)
        outside_box[box] = False
        assert not changed[outside_box].any()
        # the new lesion lies inside the host organ (or its own old place) and nowhere else changed label
        new_lesion = (label == 2) & (src_label != 2)
        assert new_lesion.sum() >= 20
        assert np.all(np.isin(src_label[new_lesion], [1, 2]))
        assert int((label == 2).sum()) == edit["to_voxels"] and edit["clipped_voxels"] >= 0
        lesion_hu, organ_hu = src_image[src_label == 2].mean(), src_image[src_label == 1].mean()
        painted = image[new_lesion].mean()
        gains.append(painted)
        assert abs(painted - lesion_hu) < abs(painted - organ_hu), (painted, lesion_hu, organ_hu)
    print("new lesion mean HU per case:", [round(float(g), 1) for g in gains])


def test_keep_edit_repaints_in_place_with_every_sampler_kept_exact(trained):
    data = FoldData(TOY_ID, "2d", 0)
    for sampler in ("ddim", "unipc"):
        out = _synthesize(961 if sampler == "ddim" else 962, "--edit", "keep", "--sampler", sampler,
                          "--resample-jumps", "2")
        for record, image, label in _cases(out):
            src_image, src_label = _source_in_raw_units(data, record["source_case"])
            assert np.array_equal(label, src_label)  # keep: the label map is unchanged
            box = tuple(slice(a, b) for a, b in record["inpaint"]["repaint_bbox"])
            outside = np.ones(image.shape, bool)
            outside[box] = False
            assert np.array_equal(image[outside], src_image[outside])
            assert record["sampler"] == sampler and record["resample_jumps"] == 2
            assert record["aligned_with_source"] is True  # labels unchanged: a PatchMix variant of its source


def test_bad_inpaint_flags_are_refused_before_anything_is_written(trained, capsys):
    raw = trained / "raw"
    before = sorted(p.name for p in raw.iterdir())

    def refused(*extra: str, labels: str = "inpaint") -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit):
            cli.synthesize_entry(["-d", str(TOY_ID), "-f", "0", "-c", "2d", "-n", "1", "--labels", labels,
                                  "-device", "cpu", "-o", "963", *extra])
        return capsys.readouterr().err
    assert "--classes 'tumour': no such label" in refused("--classes", "tumour")
    assert "--host 'liver': no such label" in refused("--host", "liver")
    assert "--host 'lesion' is also a target" in refused("--classes", "lesion", "--host", "lesion")
    assert "--edit 'teleport'" in refused("--edit", "teleport")
    assert "background" in refused("--classes", "background")
    assert "--scale-range '2'" in refused("--scale-range", "2")
    assert "--margin apply to --labels inpaint only" in refused("--margin", "3", labels="real")
    assert "cannot paint --labels inpaint" in refused("--generator", "randomised")
    assert sorted(p.name for p in raw.iterdir()) == before
    from nnunet_diffaug.synthesis.synthesize import synthesize
    with pytest.raises(DiffAugError, match="--resample-jumps"):
        synthesize(TOY_ID, "2d", 0, 1, labels="inpaint", resample_jumps=-1, device="cpu")


# ---- units: no trained model ----

def _fake_fold(volumes: dict[str, np.ndarray]):
    return SimpleNamespace(training_cases=sorted(volumes), label_values=[0, 1, 2], fold=0,
                           label_volume=lambda c: volumes[c])


def _settings(**kw):
    args = dict(classes="lesion", host="organ", edit="move", margin=2, scale_range=None)
    args.update(kw)
    return parse_inpaint_settings(dataset_json={"labels": LABELS}, label_values=[0, 1, 2], **args)


def test_structure_moved_outside_its_small_host_is_clipped_to_the_host():
    vol = np.zeros((1, 40, 40), np.int64)
    vol[0, 2:6, 2:6] = 1            # a 4x4 host, far smaller than the lesion
    yy, xx = np.mgrid[:40, :40]
    vol[0][(yy - 25) ** 2 + (xx - 25) ** 2 <= 36] = 2
    labels = InpaintLabels(_fake_fold({"a": vol}), _settings(), spatial_dims=2)
    edit = labels.edit(vol, np.random.default_rng(0), "a")
    new = (edit.labels == 2) & (vol != 2)
    assert new.any() and np.all(vol[new] == 1)                     # only host voxels became lesion
    r = edit.record
    assert r["clipped_voxels"] > 0 and r["to_voxels"] + r["clipped_voxels"] == r["from_voxels"]
    assert r["to_voxels"] <= 16
    # the vacated disc took the surrounding background, and the region covers old and new places
    assert np.all(edit.labels[vol == 2][~new[vol == 2]] == 0)
    assert edit.repaint[vol == 2].all() and edit.repaint[new].all()


def test_scale_and_paste_edits_change_the_structure_as_recorded():
    yy, xx = np.mgrid[:48, :48]
    a = np.zeros((2, 48, 48), np.int64)
    a[:, 4:44, 4:44] = 1
    a[:, (yy - 24) ** 2 + (xx - 24) ** 2 <= 25] = 2
    b = a.copy()
    b[:, (yy - 24) ** 2 + (xx - 24) ** 2 <= 25] = 1
    b[:, 10:14, 30:38] = 2                                          # a 4x8 bar in case b
    labels = InpaintLabels(_fake_fold({"a": a, "b": b}), _settings(edit="scale", scale_range="1.6:1.6"), 2)
    edit = labels.edit(a, np.random.default_rng(1), "a")
    assert edit.record["scale"] == pytest.approx(1.6)
    assert 2.0 < (edit.labels == 2).sum() / (a == 2).sum() < 3.2   # ~1.6^2 in-plane, same slices
    assert ((edit.labels == 2).sum(axis=(1, 2)) > 0).sum() == 2
    paste = InpaintLabels(_fake_fold({"a": a, "b": b}), _settings(edit="paste"), 2).edit(a, np.random.default_rng(2), "a")
    assert paste.record["paste_source_case"] == "b"
    assert (paste.labels == 2).sum() == (a == 2).sum() + paste.record["to_voxels"]   # the own lesion stays
    assert paste.record["to_voxels"] == 2 * 32 and paste.record["clipped_voxels"] == 0


def test_feather_is_zero_outside_the_region_and_one_deep_inside():
    region = np.zeros((1, 40, 40), bool)
    region[0, 5:35, 5:35] = True
    w = feather(region, margin=4)
    assert np.all(w[~region] == 0) and w[0, 20, 20] > 0.99 and 0 < w[0, 5, 20] < 0.2
    assert np.all(np.diff(w[0, 20, 5:20]) >= -1e-6)                # rises monotonically into the region


@pytest.mark.parametrize("name", DDPM_SAMPLERS)  # inpainting refuses rectified-flow models
def test_repaint_sampling_returns_the_known_latents_outside_the_mask_with_every_sampler(name):
    sampler = Sampler(name, build_train_scheduler(DiffusionConfig()), 5)
    known = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    repaint = torch.zeros(1, 1, 8, 8)
    repaint[..., 2:5, 2:5] = 1

    class Zero(torch.nn.Module):  # predicts zero noise: the repainted latents then stay finite and differ
        def forward(self, z, t, condition):
            return torch.zeros_like(z)
    z = sample_latents_inpaint(Zero(), SimpleNamespace(spatial=known), known, repaint, sampler,
                               torch.Generator().manual_seed(1), resample_jumps=1)
    keep = repaint.expand_as(known) == 0
    assert torch.equal(z[keep], known[keep])
    assert torch.isfinite(z).all() and not torch.allclose(z[~keep], known[~keep])


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_repainting_an_untrained_synthesizer_keeps_every_voxel_outside_the_region_in_2d_and_3d_multichannel(
        spatial_dims):
    from nnunet_diffaug.synthesis.config import SynthesizerConfig
    from nnunet_diffaug.synthesis.data import DataSpec
    from nnunet_diffaug.synthesis.repaint import repaint_volume
    from nnunet_diffaug.synthesis.synthesizer import Synthesizer
    torch.manual_seed(0)
    patch = [16, 16, 16] if spatial_dims == 3 else [32, 32]
    spec = DataSpec("x", "3d_fullres", "p", 0, ["a"], spatial_dims, 2, [0, 1, 2], ["CTNormalization"] * 2,
                    [-3.0, -3.0], [3.0, 3.0], patch)
    syn = Synthesizer(SynthesizerConfig.from_json({"base": "tiny"}), spec, torch.device("cpu"))
    rng = np.random.default_rng(0)
    shape = (20, 20, 16) if spatial_dims == 3 else (3, 36, 28)   # larger than the patch: encoding slides
    source = rng.normal(size=(2, *shape)).astype(np.float32)
    labels = np.zeros(shape, np.int64)
    labels[1:3, 10:16, 8:12] = 2
    region = np.zeros(shape, bool)
    region[:, 6:18, 4:16] = True
    image, record = repaint_volume(syn, labels, source, region, 3, syn.sampler("ddim", 2),
                                   torch.Generator().manual_seed(0), resample_jumps=1)
    assert image.shape == source.shape and image.dtype == np.float32
    assert np.array_equal(image[:, ~region], source[:, ~region])
    assert not np.allclose(image[:, 1, 10:14, 8:12], source[:, 1, 10:14, 8:12])
    key = "sampled_box" if spatial_dims == 3 else "sampled_slices"
    assert key in record


def test_inpainting_montage_shows_the_slice_that_changed_with_the_edited_label_and_the_difference(tmp_path):
    from nnunet_diffaug.evaluation.montage import _panels, write_montage
    rng = np.random.default_rng(0)
    source = rng.normal(size=(6, 16, 16)).astype(np.float32)
    label = np.zeros((6, 16, 16), np.uint8)
    label[1, 4:8, 4:8] = 1
    inpainted, edited = source.copy(), label.copy()
    inpainted[4, 8:12, 8:12] += 3.0                       # repainted only in slice 4
    edited[1], edited[4, 8:12, 8:12] = 0, 1               # the structure moved from slice 1 to slice 4
    files = {}
    for name, arr in {"src": source, "src_lab": label, "syn": inpainted, "syn_lab": edited}.items():
        files[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(files[name]))
    row = {"real": {"name": "case_0", "image": files["src"], "label": files["src_lab"]},
           "synthetic": {"name": "syn_0", "image": files["syn"], "label": files["syn_lab"]}}
    panels = _panels(row, same_grid=True)
    (src_img, no_overlay, _, _), (_, src_overlay, _, _), (_, edited_overlay, _, _), (syn_img, _, _, _), \
        (diff, _, (low, high), colours) = panels
    assert no_overlay is None and np.array_equal(src_img, source[4]) and np.array_equal(syn_img, inpainted[4])
    assert np.array_equal(src_overlay, label[4]) and np.array_equal(edited_overlay, edited[4])
    assert np.allclose(diff[8:12, 8:12], 3.0) and np.count_nonzero(diff) == 16  # only the repainted voxels
    assert colours == "coolwarm" and low == -high == pytest.approx(-3.0)
    write_montage([row], tmp_path / "montage.png", 1, "inpainted", inpainted=True)
    assert (tmp_path / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
