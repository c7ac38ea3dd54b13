"""Class-balanced diffusion loss: rare classes weigh more, thin structures survive pooling to the latent grid."""
import numpy as np
import pytest
import torch

from nnunet_diffaug.synthesis.config import SynthesizerConfig
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.synthesis.loss_weights import (class_voxel_fractions, class_weights, latent_weight_map,
                                                   weighted_mean)


def test_rare_classes_weigh_more_up_to_the_cap_and_background_stays_one():
    # classes: background, ribs (rare), lung, tissue (the largest foreground class), outside
    volume = np.zeros((10, 10, 10), dtype=np.uint8)
    volume[0, 0, :2] = 1                  # 2 voxels
    volume[1:3] = 2                       # 200 voxels
    volume[3:7] = 3                       # 400 voxels
    volume[9, 9, 9] = 4
    fractions = class_voxel_fractions([volume], num_classes=5)
    assert fractions.sum() == pytest.approx(1.0) and fractions[1] == pytest.approx(0.002)
    weights = class_weights(fractions, foreground=[1, 2, 3], cap=10)
    assert weights.tolist() == pytest.approx([1.0, 10.0, 2.0, 1.0, 1.0])  # ribs 200x rarer: capped
    assert class_weights(fractions, foreground=[1, 2, 3], cap=1).tolist() == [1.0] * 5  # cap 1 = off
    absent = class_weights(np.array([0.5, 0.0, 0.5, 0.0]), foreground=[1, 2], cap=4)
    assert absent.tolist() == [1.0, 4.0, 1.0, 1.0]


@pytest.mark.parametrize("spatial", [(8, 8), (8, 8, 8)])
def test_a_one_voxel_thin_structure_keeps_its_weight_on_the_latent_grid(spatial):
    labels = torch.zeros((2, 1, *spatial), dtype=torch.long)
    labels[0, 0, 3] = 2                   # a thin plane / line of class 2 in the first sample only
    weights = torch.tensor([1.0, 3.0, 7.0])
    latent = latent_weight_map(labels, weights, [s // 2 for s in spatial])
    assert latent.shape == (2, 1, *[s // 2 for s in spatial])
    assert torch.all(latent[0, 0, 1] == 7.0)           # the latent row holding voxel row 3
    assert torch.all(latent[0, 0, 0] == 1.0) and torch.all(latent[1] == 1.0)


def test_weighted_mean_is_the_plain_mean_under_uniform_weights_and_counts_weighted_errors_more():
    torch.manual_seed(0)
    errors = torch.randn(2, 3, 4, 4, 4) ** 2
    uniform = torch.full((2, 1, 4, 4, 4), 5.0)
    assert float(weighted_mean(errors, uniform)) == pytest.approx(float(errors.mean()))
    error_at_rare = torch.zeros_like(errors)
    error_at_rare[0, :, 0, 0, 0] = 1.0
    rare = torch.ones(2, 1, 4, 4, 4)
    rare[0, 0, 0, 0, 0] = 10.0
    assert float(weighted_mean(error_at_rare, rare)) > 5 * float(error_at_rare.mean())


def test_a_cap_below_one_is_refused():
    with pytest.raises(DiffAugError, match="class_balance_max_weight must be >= 1"):
        SynthesizerConfig.from_json({"base": "tiny", "diffusion": {"class_balance_max_weight": 0.5}}, "my.json")
    with pytest.raises(DiffAugError, match="autoencoder.class_balance_max_weight"):
        SynthesizerConfig.from_json({"base": "tiny", "autoencoder": {"class_balance_max_weight": 0}}, "my.json")
