"""Fast checks of the synthesis building blocks (no nnU-Net data needed)."""
from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.synthesis import checkpoint as ckpt
from nnunet_diffaug.synthesis.config import SynthesizerConfig, load_config
from nnunet_diffaug.synthesis.data import fit_patch_size, pad_to
from nnunet_diffaug.synthesis.conditioning import (Condition, TagEncoder, edge_hint, image_edges, label_boundaries,
                                                   one_hot, spatial_condition)
from nnunet_diffaug.synthesis.image_generator import build_image_generator, build_train_scheduler
from voxel_classifier import VoxelClassifier, grouped_dice
from nnunet_diffaug.synthesis.rawspace import raw_spacing, to_raw_intensity, to_sitk
from nnunet_diffaug.synthesis.sampling import Sampler, decode_latents, sample_latents
from nnunet_diffaug.synthesis.label_sources import augment_label_map


# ---------------------------------------------------------------------------------------------- config

def test_config_json_round_trip_and_partial_files(tmp_path):
    for preset in ("tiny", "default"):
        cfg = load_config(preset)
        again = SynthesizerConfig.from_json(json.loads(json.dumps(cfg.to_json())))
        assert again == cfg
    path = tmp_path / "my.json"
    path.write_text(json.dumps({"base": "tiny", "diffusion": {"conditioning": "controlnet", "steps": 7}}))
    cfg = load_config(str(path))
    assert cfg.diffusion.conditioning == "controlnet" and cfg.diffusion.steps == 7
    assert cfg.autoencoder == load_config("tiny").autoencoder  # untouched fields come from the base preset


@pytest.mark.parametrize("content, words", [
    ({"diffusion": {"stepz": 3}}, ["unknown key", "stepz"]),
    ({"autoencoder": {"perceptual_weight": 1.0}}, ["perceptual_weight = 1.0 was removed", "never downloads"]),
    ({"autoencoder": {"perceptual_weights_path": "vgg.pth"}}, ["perceptual_weights_path = 'vgg.pth' was removed"]),
    ({"diffusion": {"conditioning": "crossattn"}}, ["conditioning"]),
    ({"base": "huge"}, ["unknown base preset"]),
    ({"diffusion": {"steps": "many"}}, ["must be a number"]),
])
def test_bad_config_files_are_refused_naming_the_file(tmp_path, content, words):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DiffAugError) as e:
        load_config(str(path))
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_configs_of_older_versions_with_the_perceptual_keys_off_still_load(tmp_path):
    older = load_config("tiny").to_json()
    older["autoencoder"].update(perceptual_weight=0.0, perceptual_weights_path=None)  # as every earlier config.json
    path = tmp_path / "config.json"
    path.write_text(json.dumps(older))
    assert load_config(str(path)) == load_config("tiny")


def test_default_preset_builds_and_runs_in_2d():
    from nnunet_diffaug.synthesis.autoencoder import build_autoencoder
    cfg = load_config("default")
    model = build_image_generator(cfg.diffusion, 2, cfg.autoencoder.latent_channels, 7).eval()
    ae = build_autoencoder(cfg.autoencoder, 2, 1).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 8, 8), torch.tensor([3]), Condition(one_hot(torch.zeros(1, 1, 32, 32), 7)))
        img = ae.decode_stage_2_outputs(out)
    assert out.shape == (1, 4, 8, 8) and img.shape == (1, 1, 32, 32)


def test_missing_config_file_is_refused():
    with pytest.raises(DiffAugError, match="no such config file"):
        load_config("/nonexistent/cfg.json")


# ---------------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_restores_weights_and_optimizer(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    tensors = ckpt.prefixed("m", model.state_dict())
    t, j = ckpt.optimizer_to_flat("opt", opt)
    ckpt.save_checkpoint(tmp_path / "c.safetensors", {**tensors, **t}, {"step": 3, "opt": j})
    assert not list(tmp_path.glob(".partial-*"))  # the temporary sibling is gone

    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    loaded, state = ckpt.load_checkpoint(tmp_path / "c.safetensors")
    model2.load_state_dict(ckpt.unprefixed("m", loaded))
    ckpt.optimizer_from_flat("opt", opt2, loaded, state["opt"])
    assert state["step"] == 3
    # one more identical step on both gives identical weights: moments and step counters came back
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        loss = m(x).pow(2).mean()
        o.zero_grad()
        loss.backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "autoencoder_checkpoint.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DiffAugError, match="autoencoder_checkpoint.safetensors"):
        ckpt.load_checkpoint(bad)


# ---------------------------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("name", ["dpmpp", "unipc", "ddim", "ddpm"])
def test_samplers_run_on_5d_latents_with_a_monai_unet(name):
    cfg = load_config("tiny").diffusion
    cfg.num_train_timesteps = 50  # keeps the full-chain ddpm quick
    model = build_image_generator(cfg, 3, 3, 4).eval()
    sampler = Sampler(name, build_train_scheduler(cfg), steps=5)
    labels = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    labels[..., 8:, :, :] = 2
    z1 = sample_latents(model, Condition(one_hot(labels, 4)), (1, 3, 8, 8, 8), sampler, torch.Generator().manual_seed(1))
    z2 = sample_latents(model, Condition(one_hot(labels, 4)), (1, 3, 8, 8, 8), sampler, torch.Generator().manual_seed(1))
    assert z1.shape == (1, 3, 8, 8, 8) and torch.isfinite(z1).all()
    assert torch.equal(z1, z2)  # same seed, same sample (the sampler state is reset per sample)
    assert len(sampler.timesteps) == (50 if name == "ddpm" else 5)


def test_fast_cpu_convolutions_give_the_stock_result():
    from nnunet_diffaug.synthesis.autoencoder import build_autoencoder
    from nnunet_diffaug.synthesis.sampling import enable_fast_cpu_convolutions
    torch.manual_seed(0)
    ae = build_autoencoder(load_config("tiny").autoencoder, 3, 1).eval()
    z = torch.randn(1, 3, 4, 8, 8)
    with torch.no_grad():
        stock = ae.decode_stage_2_outputs(z)
        enable_fast_cpu_convolutions(ae)
        fast = ae.decode_stage_2_outputs(z)
    assert torch.allclose(stock, fast, atol=1e-4)
    # training keeps the stock path (gradients flow as usual)
    ae.train()
    ae.decode_stage_2_outputs(z).mean().backward()
    assert all(p.grad is not None for p in ae.decoder.parameters() if p.requires_grad)


def test_controlnet_generator_matches_latent_size():
    cfg = load_config("tiny").diffusion
    cfg.conditioning = "controlnet"
    model = build_image_generator(cfg, 2, 3, 5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), Condition(one_hot(torch.zeros(2, 1, 32, 32), 5)))
    assert out.shape == (2, 3, 16, 16)


def test_sliding_window_decoding_covers_large_latents():
    from nnunet_diffaug.synthesis.autoencoder import build_autoencoder
    ae = build_autoencoder(load_config("tiny").autoencoder, 3, 1).eval()
    z = torch.randn(1, 3, 4, 12, 20)
    direct = decode_latents(ae, z, window=[16, 16, 16], overlap=0.25)
    windowed = decode_latents(ae, z, window=[4, 8, 8], overlap=0.25)
    assert direct.shape == windowed.shape == (1, 1, 8, 24, 40)
    # gaussian blending of overlapping windows stays close to decoding everything at once
    assert float((direct - windowed).abs().mean()) < 0.5 * float(direct.abs().mean()) + 1e-3


# ---------------------------------------------------------------------------------------------- data helpers

def test_patch_fits_volumes_and_divisor():
    assert fit_patch_size([32, 32, 32], [(4, 64, 64), (4, 60, 64)], 8) == [8, 32, 32]
    assert fit_patch_size([64, 64], [(30, 50)], 8) == [32, 56]
    arr, pads = pad_to(np.arange(4).reshape(1, 1, 4), [1, 8])
    assert arr.shape == (1, 1, 8) and pads == [(0, 0), (2, 2)]


def test_label_augmentation_keeps_labels_and_is_seeded():
    from nnunet_diffaug.synthesis.config import SamplingConfig
    lab = np.zeros((4, 32, 32), dtype=np.uint8)
    lab[:, 8:20, 10:24] = 3
    lab[:, 20:26, 4:10] = 1
    cfg = SamplingConfig(rotate_degrees=15, scale_range=0.1, translate_fraction=0.05)
    a, _, pa = augment_label_map(lab, np.random.default_rng(5), cfg)
    b, _, pb = augment_label_map(lab, np.random.default_rng(5), cfg)
    c, _, _ = augment_label_map(lab, np.random.default_rng(6), cfg)
    assert a.shape == lab.shape and set(np.unique(a)) <= {0, 1, 3}
    assert np.array_equal(a, b) and pa == pb
    assert not np.array_equal(a, lab) and not np.array_equal(a, c)
    assert np.array_equal(a[0], a[3])  # in-plane only: every slice of the slab moves alike
    # the edge hint's real image moves with its labels: same seed, same deformation
    image = np.stack([(lab == 3).astype(np.float32) * 100.0])
    d, moved, _ = augment_label_map(lab, np.random.default_rng(5), cfg, image)
    assert np.array_equal(d, a) and moved.shape == image.shape
    assert np.mean((moved[0] > 50) == (d == 3)) > 0.97


# ---------------------------------------------------------------------------------------------- raw space

def test_raw_geometry_undoes_nnunet_transpose():
    vol = np.zeros((32, 4, 16), dtype=np.float32)  # transposed order (like transpose_forward [1, 0, 2])
    vol[1, 2, 3] = 1
    img = to_sitk(vol, [12.0, 10.0, 6.0], [1, 0, 2])
    import SimpleITK as sitk
    arr = sitk.GetArrayFromImage(img)
    assert arr.shape == (4, 32, 16) and arr[2, 1, 3] == 1
    assert img.GetSpacing() == (6.0, 12.0, 10.0)  # ITK order (x, y, z) of numpy (z, y, x)


def test_ct_intensities_return_to_hounsfield_units():
    props = {"mean": -256.0, "std": 400.0}
    assert np.allclose(to_raw_intensity(np.array([0.0, 1.0, -2.0]), "CTNormalization", props), [-256, 144, -1056])
    z = np.array([0.3, -1.0])
    assert np.array_equal(to_raw_intensity(z, "ZScoreNormalization", None), z)


def test_2d_spacing_uses_median_slice_thickness():
    class PM:
        original_median_spacing_after_transp = [10.0, 6.0, 6.0]

    class CM:
        spacing = [6.0, 6.0]
    assert raw_spacing(PM, CM, 2) == [10.0, 6.0, 6.0]


# ---------------------------------------------------------------------------------------------- metrics

def test_voxel_classifier_reads_labels_back_from_real_like_images():
    rng = np.random.default_rng(0)
    lab = np.zeros((32, 32), dtype=np.uint8)
    lab[8:24, 8:24] = 1
    lab[12:20, 12:20] = 2
    img = np.choose(lab, [-1.0, 0.5, 1.5]) + rng.normal(0, 0.2, lab.shape)
    clf = VoxelClassifier.fit([img], [lab])
    assert grouped_dice(clf.predict(img), lab, [[0], [1], [2]]) > 0.9
    noise = rng.normal(0, 1, lab.shape)
    assert grouped_dice(clf.predict(noise), lab, [[0], [1], [2]]) < 0.6


# ---------------------------------------------------------------------------------------------- extra conditioning

def test_label_boundaries_mark_exactly_where_classes_meet():
    lab = torch.zeros(1, 1, 12, 12, dtype=torch.long)
    lab[..., 4:8, 4:8] = 2
    b = label_boundaries(lab)[0, 0]
    inside, outside = lab[0, 0] == 2, lab[0, 0] == 0
    ring = torch.zeros(12, 12, dtype=torch.bool)
    ring[3:9, 3:9] = True
    ring[5:7, 5:7] = False  # the square's centre has no neighbour of another class
    assert torch.equal(b.bool(), ring) and b[inside].any() and b[outside].any()
    assert label_boundaries(torch.ones(1, 1, 6, 6, 6, dtype=torch.long)).sum() == 0  # 3D, one class: none


def test_image_edges_find_intensity_steps_and_nothing_in_flat_images():
    img = torch.zeros(2, 1, 32, 32)
    img[0, :, :, 16:] = 3.0                        # a vertical step in sample 0; sample 1 is flat
    e = image_edges(img)
    cols = e[0, 0].sum(dim=0)
    assert cols[14:18].sum() == e[0, 0].sum() > 0  # edges only along the step
    assert e[1].sum() == 0
    noise = torch.randn(1, 2, 16, 16, 16)          # 3D, two channels: the top decile is marked
    assert 0.05 < float(image_edges(noise).mean()) < 0.15


def test_edge_hint_adds_image_edges_only_where_asked():
    lab = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    img = torch.zeros(2, 1, 32, 32)
    img[:, :, 16:, :] = 5.0                        # an intensity edge the labels do not have
    hint = edge_hint(lab, img, use_image=torch.tensor([True, False]))
    assert hint[0].sum() > 0 and hint[1].sum() == 0
    cond = spatial_condition(lab, 4, True, img)
    assert cond.shape == (2, 5, 32, 32) and torch.equal(cond[:, :4], one_hot(lab, 4))
    assert spatial_condition(lab, 4, False, img).shape == (2, 4, 32, 32)


def test_tag_encoder_follows_spacing_and_falls_back_to_the_null_vector():
    torch.manual_seed(0)
    enc = TagEncoder(num_channels=2, dim=8)
    enc.set_reference_spacing([3.0, 1.0, 1.0])
    spacing = torch.tensor([[3.0, 1.0, 1.0], [6.0, 2.0, 2.0], [float("nan")] * 3])
    vectors = enc(spacing, 3)
    assert vectors.shape == (3, 8)
    assert not torch.allclose(vectors[0], vectors[1])                   # differs with spacing
    names = enc.channel_names.weight.sum(dim=0)
    assert torch.allclose(vectors[2], names + enc.no_spacing)           # unknown spacing: the learned null vector
    assert torch.allclose(enc(None, 1)[0], vectors[2])
    channels = enc.as_channels(spacing, torch.zeros(3, 5, 4, 4, 4))
    assert channels.shape == (3, 8, 4, 4, 4) and torch.equal(channels[1, :, 2, 3, 1], vectors[1])


@pytest.mark.parametrize("conditioning", ["spade", "controlnet"])
def test_image_model_reads_edge_hint_and_tags(conditioning):
    from nnunet_diffaug.synthesis.config import tiny
    cfg = tiny()
    cfg.diffusion.conditioning = conditioning
    cfg.diffusion.edge_hint = cfg.diffusion.tag_conditioning = True
    torch.manual_seed(0)
    model = build_image_generator(cfg.diffusion, 2, 3, 4, image_channels=1).eval()
    for p in model.parameters():  # ControlNet starts with zero outputs; perturb so every path is live
        p.data += 0.01 * torch.randn_like(p)
    lab = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    lab[..., 8:24, 8:24] = 1
    img = torch.zeros(1, 1, 32, 32)
    img[..., :, 4:6] = 4.0
    z, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        base = model(z, t, Condition(spatial_condition(lab, 4, True), torch.tensor([[1.0, 1.0, 1.0]])))
        edged = model(z, t, Condition(spatial_condition(lab, 4, True, img), torch.tensor([[1.0, 1.0, 1.0]])))
        coarse = model(z, t, Condition(spatial_condition(lab, 4, True), torch.tensor([[5.0, 1.0, 1.0]])))
    assert not torch.allclose(base, edged) and not torch.allclose(base, coarse)
