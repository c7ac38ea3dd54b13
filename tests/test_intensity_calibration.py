"""Per-class intensity calibration of painted cases: each class moved to its target mean, texture kept."""
import numpy as np
import pytest

from nnunet_diffaug.synthesis.intensity_calibration import calibrate_class_intensity


def _case(rng):
    labels = np.zeros((8, 32, 32), np.int64)
    labels[:, 4:12, 4:28] = 1           # a structure painted like its surroundings
    labels[:, 20:22, :] = 2             # a thin one
    labels[:, 0, 0] = 3                 # 'outside'
    image = rng.normal(0.0, 1.0, (2, *labels.shape)).astype(np.float32)
    return image, labels


def test_each_class_gets_its_target_mean_and_spread_and_keeps_its_texture():
    rng = np.random.default_rng(0)
    image, labels = _case(rng)
    target = np.full((4, 2, 2), np.nan, np.float32)
    target[1] = [[2.0, 0.6], [-1.0, 1.5]]   # per channel: mean, sd (within the gain limit of 2)
    target[2] = [[3.0, 0.8], [0.5, 1.9]]
    out, record = calibrate_class_intensity(image, labels, target, classes=[1, 2])
    for k in (1, 2):
        for c in range(2):
            values = out[c][labels == k]
            assert values.mean() == pytest.approx(target[k, c, 0], abs=1e-4)
            assert values.std() == pytest.approx(target[k, c, 1], rel=1e-3)
            # an affine map of the painted values: the pattern inside the class is the painted one
            assert np.corrcoef(values, image[c][labels == k])[0, 1] == pytest.approx(1.0, abs=1e-5)
    untouched = (labels == 0) | (labels == 3)
    assert np.array_equal(out[:, untouched], image[:, untouched])  # background and 'outside' as painted
    assert record["1"]["target_mean"] == [2.0, -1.0] and record["1"]["voxels"] == int((labels == 1).sum())


def test_gain_is_clipped_and_flat_or_untargeted_classes_are_left_alone():
    rng = np.random.default_rng(1)
    image, labels = _case(rng)
    image[0][labels == 2] = 0.3             # painted flat: no spread to scale
    target = np.full((4, 2, 2), np.nan, np.float32)
    target[1] = [[0.0, 10.0], [0.0, 0.01]]  # far wider / narrower than painted
    target[2] = [[1.0, 1.0], [1.0, 1.0]]
    out, record = calibrate_class_intensity(image, labels, target, classes=[1, 2, 3], max_gain=2.0)
    assert record["1"]["gain"] == [2.0, 0.5]
    assert np.allclose(out[0][labels == 2], 1.0)  # flat class: shifted to the mean, gain 1
    assert "3" not in record and np.array_equal(out[:, labels == 3], image[:, labels == 3])  # no target: as painted


def test_only_the_given_region_moves_and_only_its_voxels_set_the_correction():
    rng = np.random.default_rng(2)
    image, labels = _case(rng)
    region = np.zeros(labels.shape, bool)
    region[:, :, 16:] = True                 # e.g. the repainted region of an inpainted case
    image[0][(labels == 1) & ~region] += 5.0  # real voxels of the class outside the region: not to be counted
    target = np.zeros((4, 2, 2), np.float32)
    target[..., 1] = 1.0
    target[1, :, 0] = 2.0
    out, _ = calibrate_class_intensity(image, labels, target, classes=[1], within=region)
    assert np.array_equal(out[:, ~region], image[:, ~region])
    assert out[0][(labels == 1) & region].mean() == pytest.approx(2.0, abs=1e-4)
