"""The ratio-aware loader: counts per batch, shuffling against positional oversampling, key routing."""
import numpy as np
import pytest

from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_diffaug.trainers.mixing import (SYNTHETIC_KEY_PREFIX, MixedDataset, RatioDataLoader, is_synthetic_key,
                                            synthetic_count)


class _FakeDataset:
    def __init__(self, ids, tag):
        self.identifiers = list(ids)
        self.tag = tag

    def load_case(self, identifier):
        return self.tag, identifier


def _loader(ratio, batch_size=6, n_real=5, n_synth=7):
    data = MixedDataset(_FakeDataset([f"r{i}" for i in range(n_real)], "real"),
                        _FakeDataset([f"r{i}" for i in range(n_synth)], "synthetic"))  # same names on purpose
    lm = LabelManager({"background": 0, "a": 1}, regions_class_order=None)
    return RatioDataLoader(data, batch_size, (8, 8, 8), (8, 8, 8), lm, oversample_foreground_percent=0.33,
                           synthetic_ratio=ratio)


def test_integer_ratio_gives_exact_count_every_batch():
    np.random.seed(0)
    dl = _loader(0.5, batch_size=6)
    for _ in range(200):
        keys = dl.get_indices()
        assert len(keys) == 6
        assert sum(is_synthetic_key(k) for k in keys) == 3


def test_fractional_ratio_is_stochastically_rounded_to_the_exact_mean():
    rng = np.random.RandomState(1)
    counts = [synthetic_count(1 / 3, 2, rng) for _ in range(30000)]
    assert set(counts) == {0, 1}  # never more than ceil(2/3)
    assert np.mean(counts) / 2 == pytest.approx(1 / 3, abs=0.01)


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_extreme_ratios(ratio):
    np.random.seed(0)
    dl = _loader(ratio, batch_size=4)
    for _ in range(50):
        assert sum(is_synthetic_key(k) for k in dl.get_indices()) == round(ratio * 4)


def test_synthetic_samples_reach_the_foreground_oversampled_positions():
    # nnU-Net forces foreground in the last third of a batch; unshuffled mixing would starve one kind
    np.random.seed(0)
    dl = _loader(0.5, batch_size=6)
    last_third_synthetic = [is_synthetic_key(dl.get_indices()[-1]) for _ in range(4000)]
    first_synthetic = [is_synthetic_key(dl.get_indices()[0]) for _ in range(4000)]
    assert np.mean(last_third_synthetic) == pytest.approx(0.5, abs=0.05)
    assert np.mean(first_synthetic) == pytest.approx(0.5, abs=0.05)


def test_mixed_dataset_routes_keys_and_names_cannot_collide():
    data = MixedDataset(_FakeDataset(["case_1"], "real"), _FakeDataset(["case_1"], "synthetic"))
    assert data.load_case("case_1") == ("real", "case_1")
    assert data.load_case(SYNTHETIC_KEY_PREFIX + "case_1") == ("synthetic", "case_1")
    assert len(set(data.identifiers)) == 2


def test_bad_ratio_refused():
    with pytest.raises(ValueError):
        synthetic_count(1.5, 2)
    with pytest.raises(ValueError):
        _loader(0.5, n_synth=0)
