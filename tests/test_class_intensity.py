"""Per-class intensity: a set painted like the real one scores ~0, a class painted like another stands out."""
import numpy as np
import pytest

from nnunet_diffaug.evaluation.class_intensity import case_class_means, class_intensity_report

CLASS_MEANS = {0: -1.0, 1: 2.0, 2: 0.3}   # background, "bone", "tissue" (normalised units)


def _case(rng, paint=None):
    seg = np.zeros((1, 8, 16, 16), dtype=np.int16)
    seg[0, :, 4:12, 4:12] = 2
    seg[0, :, 7:9, 7:9] = 1
    paint = {**CLASS_MEANS, **(paint or {})}
    data = np.empty((1, 8, 16, 16), dtype=np.float32)
    for c, mean in paint.items():
        inside = seg[0] == c
        data[0][inside] = rng.normal(mean + rng.normal(0, 0.1), 0.2, size=int(inside.sum()))
    return data, seg


def _report(synthetic_paint):
    rng = np.random.default_rng(0)
    means = {"training": [case_class_means(*_case(rng), [1, 2]) for _ in range(4)],
             "validation": [case_class_means(*_case(rng), [1, 2]) for _ in range(3)],
             "synthetic": [case_class_means(*_case(rng, synthetic_paint), [1, 2]) for _ in range(5)]}
    return class_intensity_report(means, [1, 2])


def test_a_set_painted_like_the_real_one_differs_by_less_than_the_real_spread():
    report = _report(None)
    assert report["worst_standardised_difference"] < 1.5
    assert report["per_class"]["1"]["real_mean"][0] == pytest.approx(2.0, abs=0.15)


def test_a_structure_painted_like_its_surroundings_is_the_worst_class():
    report = _report({1: CLASS_MEANS[2]})   # bone painted as tissue: what a small synthesizer does to ribs
    assert report["worst_class"] == "1"
    assert report["per_class"]["1"]["standardised_difference"][0] > 5
    assert report["per_class"]["2"]["standardised_difference"][0] < 1.5


def test_classes_absent_from_a_case_are_left_out():
    data = np.zeros((2, 4, 4), dtype=np.float32)
    seg = np.zeros((1, 4, 4), dtype=np.int16)
    seg[0, 0, 0] = 2
    data[1, 0, 0] = 5.0
    assert case_class_means(data, seg, [1, 2]) == {2: [0.0, 5.0]}
