"""PatchMix (DiffBoost-style patch-level merging): masks, merging, shared spatial transforms, a real run."""
import json
import re

import numpy as np
import pytest
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.trainers.patch_mix import (ChannelStack, PairedDataset, PatchMixForward, merge_outputs,
                                               merge_patch_size, patch_mask)
from support import (EXAMPLE_ID, EXAMPLE_NAME, console_script, make_stand_in_synthetic_set, nnunet_env,
                     private_copy_of_example, run)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.6, 1.0])
def test_mask_has_the_requested_real_fraction_and_is_constant_per_patch(alpha):
    g = torch.Generator().manual_seed(0)
    mask = patch_mask(64, (32, 48), (8, 16), alpha, generator=g)
    assert mask.shape == (64, 1, 32, 48)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.mean().item() == pytest.approx(alpha, abs=0.03)
    blocks = mask.reshape(64, 1, 4, 8, 3, 16)  # 4 x 3 patches of 8 x 16
    assert torch.all(blocks.amax(dim=(3, 5)) == blocks.amin(dim=(3, 5)))


def test_alpha_one_merges_to_exactly_the_real_output_at_every_scale():
    real = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    synthetic = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    merged = merge_outputs(real, synthetic, patch_mask(2, (16, 16), (4, 4), 1.0))
    assert all(torch.equal(m, r) for m, r in zip(merged, real))
    merged0 = merge_outputs(real, synthetic, patch_mask(2, (16, 16), (4, 4), 0.0))
    assert all(torch.equal(m, s) for m, s in zip(merged0, synthetic))


def test_merge_takes_each_patch_from_one_source_at_lower_resolutions_too():
    real, synthetic = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1  # top half real
    merged = merge_outputs(real, synthetic, mask)
    assert torch.all(merged[..., :4, :] == 0) and torch.all(merged[..., 4:, :] == 1)


def test_forward_wrapper_runs_both_halves_and_keeps_gradients():
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    wrapper = PatchMixForward(net, 1, (4, 4), 0.5)
    x = torch.randn(3, 2, 16, 16)
    out = wrapper(x)
    out.sum().backward()
    assert out.shape == (3, 2, 16, 16) and net.weight.grad is not None
    with pytest.raises(RuntimeError, match="stacked channels"):
        wrapper(torch.randn(3, 1, 16, 16))


def test_merge_patch_size_parsing_and_capping():
    assert merge_patch_size(64, [4, 32, 32]) == (2, 16, 16)
    assert merge_patch_size("1,8,8", [4, 32, 32]) == (1, 8, 8)
    assert merge_patch_size("64", [256, 256]) == (64, 64)
    with pytest.raises(DiffAugError):
        merge_patch_size("a,b", [32, 32])
    with pytest.raises(DiffAugError):
        merge_patch_size((8, 8), [4, 32, 32])


def test_channel_stack_reads_only_the_crop():
    a, b = np.random.rand(1, 5, 6, 7), np.random.rand(2, 5, 6, 7)
    stack = ChannelStack([a, b])
    crop = (slice(None), slice(1, 4), slice(0, 6), slice(2, 5))
    assert stack.shape == (3, 5, 6, 7)
    np.testing.assert_allclose(stack[crop], np.concatenate([a[crop], b[crop]]).astype(np.float32))


def _nearest_class_mean_accuracy(channel: np.ndarray, label: np.ndarray) -> float:
    classes = np.unique(label)
    means = np.array([channel[label == k].mean() for k in classes])
    predicted = classes[np.argmin(np.abs(channel[..., None] - means), axis=-1)]
    return float((predicted == label).mean())


def test_pair_shares_nnunets_spatial_augmentation():
    """Real and synthetic channels of one sample go through nnU-Net's training transforms together: both
    still follow the (transformed) label map. Transformed separately, the synthetic one would not."""
    rng = np.random.default_rng(0)
    label = np.zeros((64, 64), dtype=np.int16)
    label[10:30, 8:40] = 1
    label[35:60, 30:58] = 2
    real = 100.0 * label + rng.normal(0, 3, label.shape)
    synthetic = -60.0 * label + 20 + rng.normal(0, 3, label.shape)  # other intensities, same anatomy
    transforms = nnUNetTrainer.get_training_transforms(
        (64, 64), (-np.pi, np.pi), None, (0, 1), False, use_mask_for_norm=[False, False], is_cascaded=False,
        foreground_labels=[1, 2], regions=None, ignore_label=None)
    torch.manual_seed(0)
    np.random.seed(0)
    shared, separate = [], []
    for _ in range(10):
        out = transforms(image=torch.from_numpy(np.stack([real, synthetic])).float(),
                         segmentation=torch.from_numpy(label[None]))
        y = out["segmentation"][0].numpy()
        shared.append(min(_nearest_class_mean_accuracy(out["image"][c].numpy(), y) for c in (0, 1)))
        alone = transforms(image=torch.from_numpy(synthetic[None]).float(), segmentation=torch.from_numpy(label[None]))
        separate.append(_nearest_class_mean_accuracy(alone["image"][0].numpy(), y))
    assert np.mean(shared) > 0.85
    assert np.mean(separate) < np.mean(shared) - 0.15


class _Fake:
    def __init__(self, ids):
        self.identifiers = list(ids)

    def load_case(self, i):
        return np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 4)), None, {}


def test_missing_variants_are_refused():
    with pytest.raises(DiffAugError, match=r"no(ne exists for| aligned).*case_b.*--labels real-aligned"):
        PairedDataset(_Fake(["case_a", "case_b"]), _Fake(["s0"]), {"case_a": ["s0"]})


@pytest.mark.slow
def test_short_patchmix_run_with_the_console_script(planned_example, tmp_path):
    source, splits = planned_example
    root = private_copy_of_example(source, tmp_path / "nnunet")
    make_stand_in_synthetic_set(root / "raw", EXAMPLE_NAME, 1, splits[1]["train"], 8, dataset_id=911, aligned=True)
    trainer = "nnUNetTrainerDiffAugPatchMix"
    env = nnunet_env(root, DIFFAUG_NUM_EPOCHS=2, DIFFAUG_ITERATIONS_PER_EPOCH=6, DIFFAUG_VAL_ITERATIONS=2,
                     nnUNet_n_proc_DA=1, DIFFAUG_PATCHMIX_PATCH="1,8,8")
    run([console_script("nnUNetv2_train"), str(EXAMPLE_ID), "3d_fullres", "1", "-tr", trainer, "-p",
         "nnUNetPlansDiffAugSmall", "-device", "cpu"], env)
    out = root / "results" / EXAMPLE_NAME / f"{trainer}__nnUNetPlansDiffAugSmall__3d_fullres" / "fold_1"
    log = sorted(out.glob("training_log_*.txt"))[-1].read_text()
    assert "alpha = 0.60" in log and "merge patch [1, 8, 8] voxels, 8 aligned variant(s)" in log
    assert len(re.findall(r"train_loss", log)) == 2 and "Training done." in log
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert {c["reference_file"].split("/")[-1][:-7] for c in summary["metric_per_case"]} == set(splits[1]["val"])
