"""Synthetic-share schedules and equal real exposure: the schedule itself, the loader following it (also
from worker processes), and the real trainer in-process (drawn shares, iterations, stats JSON, r = 0)."""
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.trainers.mixing import MixedDataset, RatioDataLoader, is_synthetic_key
from nnunet_diffaug.trainers.schedule import FEW_REAL_CASES, equal_exposure_iterations, parse_schedule
from nnunet_diffaug.trainers.training_stats import STATS_FILE
from support import EXAMPLE_NAME, in_process_trainer, make_stand_in_synthetic_set, private_copy_of_example

# ---- the schedule ------------------------------------------------------------------------------

def test_schedules_give_the_documented_share_per_epoch():
    r, n = 0.4, 5
    assert [parse_schedule("constant", "x").ratio(r, e, n) for e in range(n)] == [r] * n
    assert [parse_schedule("linear", "x").ratio(r, e, n) for e in range(n)] == pytest.approx([0.4, 0.3, 0.2, 0.1, 0])
    assert [parse_schedule("cutoff:0.4", "x").ratio(r, e, n) for e in range(n)] == [r, r, 0, 0, 0]
    assert [parse_schedule("cutoff:1", "x").ratio(r, e, n) for e in range(n)] == [r] * n
    assert parse_schedule("linear", "x").ratio(r, 0, 1) == r  # a one-epoch run mixes, it does not divide by 0
    assert str(parse_schedule(" Cutoff:0.50 ", "x")) == "cutoff:0.5"


def test_auto_chooses_the_cutoff_with_few_real_cases_and_a_constant_share_with_more():
    auto = parse_schedule("auto", "x")
    assert [str(auto.resolve(n)) for n in (1, 2, FEW_REAL_CASES, FEW_REAL_CASES + 1, 100)] == \
        ["cutoff:0.75"] * 3 + ["constant"] * 2
    assert parse_schedule("linear", "x").resolve(2) == parse_schedule("linear", "x")  # only 'auto' is chosen
    with pytest.raises(ValueError, match="resolve"):
        auto.ratio(0.3, 0, 4)  # an unresolved 'auto' has no share: the trainer must resolve it first


@pytest.mark.parametrize("text", ["exponential", "cutoff", "cutoff:0", "cutoff:1.5", "cutoff:-0.2", "cutoff:half",
                                  "linear:0.5", ""])
def test_bad_schedule_strings_are_refused_naming_their_source(text):
    with pytest.raises(DiffAugError, match=r"Environment variable DIFFAUG_SYNTHETIC_SCHEDULE='"):
        parse_schedule(text, "Environment variable DIFFAUG_SYNTHETIC_SCHEDULE")


def test_equal_exposure_iterations():
    assert equal_exposure_iterations(250, 0) == 250
    assert equal_exposure_iterations(250, 1 / 3) == 375
    assert equal_exposure_iterations(3, 0.5) == 6
    assert equal_exposure_iterations(5, 0.1) == 6  # 5.56 rounded
    with pytest.raises(DiffAugError, match="r < 1.*DIFFAUG_EQUAL_REAL_EXPOSURE"):
        equal_exposure_iterations(250, 1.0)


def test_iteration_scale_gives_the_stock_arm_the_equal_exposure_compute(monkeypatch):
    from types import SimpleNamespace
    from nnunet_diffaug.trainers.budget import apply_budget_from_env
    monkeypatch.setenv("DIFFAUG_ITERATIONS_PER_EPOCH", "250")
    monkeypatch.setenv("DIFFAUG_ITERATION_SCALE", "1.5")
    trainer = SimpleNamespace(num_epochs=1000, num_iterations_per_epoch=250, num_val_iterations_per_epoch=50)
    apply_budget_from_env(trainer)
    # as many iterations as diffaug_r33_equalreal trains (stock_x150 is its equal-compute control)
    assert trainer.num_iterations_per_epoch == equal_exposure_iterations(250, 1 / 3) == 375
    for bad in ("0.5", "x"):
        monkeypatch.setenv("DIFFAUG_ITERATION_SCALE", bad)
        with pytest.raises(DiffAugError, match="DIFFAUG_ITERATION_SCALE"):
            apply_budget_from_env(trainer)


# ---- the loader following a schedule ------------------------------------------------------------

class _FakeDataset:
    def __init__(self, ids):
        self.identifiers = list(ids)

    def load_case(self, identifier):
        raise AssertionError("the tests here only draw keys")


def _loader(ratio, batch_size=2, cls=RatioDataLoader):
    data = MixedDataset(_FakeDataset([f"r{i}" for i in range(5)]), _FakeDataset([f"s{i}" for i in range(7)]))
    lm = LabelManager({"background": 0, "a": 1}, regions_class_order=None)
    return cls(data, batch_size, (8, 8, 8), (8, 8, 8), lm, oversample_foreground_percent=0.33,
               synthetic_ratio=ratio)


def _draw_epoch(loader, iterations):
    keys = [k for _ in range(iterations) for k in loader.get_indices()]
    synthetic = sum(is_synthetic_key(k) for k in keys)
    return synthetic, len(keys) - synthetic


@pytest.mark.parametrize("spelled", ["constant", "linear", "cutoff:0.5", "cutoff:0.75"])
def test_drawn_shares_follow_the_schedule(spelled):
    np.random.seed(0)
    schedule, base, epochs, iterations, batch = parse_schedule(spelled, "x"), 1 / 3, 6, 1500, 2
    loader = _loader(schedule.ratio(base, 0, epochs), batch)
    for epoch in range(epochs):
        target = schedule.ratio(base, epoch, epochs)
        loader.synthetic_ratio = target
        synthetic, real = _draw_epoch(loader, iterations)
        assert synthetic / (synthetic + real) == pytest.approx(target, abs=0.03), (spelled, epoch)
        if target == 0:
            assert synthetic == 0


@pytest.mark.parametrize("spelled", ["constant", "linear", "cutoff:0.5"])
def test_equal_exposure_draws_as_many_real_samples_as_stock(spelled):
    np.random.seed(1)
    schedule, base, epochs, stock_iterations, batch = parse_schedule(spelled, "x"), 1 / 3, 5, 300, 2
    loader = _loader(base, batch)
    real_total, iterations_total = 0, 0
    for epoch in range(epochs):
        target = schedule.ratio(base, epoch, epochs)
        loader.synthetic_ratio = target
        iterations = equal_exposure_iterations(stock_iterations, target)
        real_total += _draw_epoch(loader, iterations)[1]
        iterations_total += iterations
    stock_real = stock_iterations * batch * epochs
    # stochastic rounding: one Bernoulli per batch (sd <= 0.5), plus half an iteration of rounding per epoch
    tolerance = 4 * 0.5 * np.sqrt(iterations_total) + epochs * batch / 2
    assert abs(real_total - stock_real) <= tolerance
    assert iterations_total > stock_iterations * epochs  # the extra compute equal exposure costs


def test_loader_refuses_a_positive_share_without_synthetic_cases():
    data = MixedDataset(_FakeDataset(["r0"]), _FakeDataset([]))
    lm = LabelManager({"background": 0, "a": 1}, regions_class_order=None)
    loader = RatioDataLoader(data, 2, (8, 8, 8), (8, 8, 8), lm, oversample_foreground_percent=0.33,
                             synthetic_ratio=0.0)
    with pytest.raises(ValueError, match="no synthetic cases"):
        loader.synthetic_ratio = 0.5


class _KeysOnlyLoader(RatioDataLoader):
    """Batches of keys only: what the worker processes draw, without loading images."""

    def generate_train_batch(self):
        return {"keys": self.get_indices()}


def _share_of(batches):
    keys = [k for b in batches for k in b["keys"]]
    return sum(is_synthetic_key(k) for k in keys) / len(keys)


def test_a_share_set_in_the_main_process_reaches_forked_workers():
    """nnU-Net's loader runs in worker processes that prefetch: a plain attribute would never change there."""
    augmenter = NonDetMultiThreadedAugmenter(_loader(0.0, cls=_KeysOnlyLoader), None, num_processes=2, num_cached=2,
                                             seeds=[1, 2], wait_time=0.002)
    try:
        loader = augmenter.generator
        assert _share_of([next(augmenter) for _ in range(10)]) == 0
        for new_share in (1.0, 0.0):
            loader.synthetic_ratio = new_share
            shares = [_share_of([next(augmenter)]) for _ in range(40)]
            # prefetched batches (queue + one per worker + the results thread's) may still hold the old share;
            # the shares are in the message so that a failure says whether the change arrived late or never
            assert shares[-20:] == [new_share] * 20, f"per-batch synthetic shares after setting {new_share}: {shares}"
    finally:
        augmenter._finish()


# ---- the real trainer, in-process ---------------------------------------------------------------

@pytest.fixture(scope="module")
def example_with_synthetic_fold0(planned_example, tmp_path_factory):
    source, splits = planned_example
    root = private_copy_of_example(source, tmp_path_factory.mktemp("schedules"))
    make_stand_in_synthetic_set(root / "raw", EXAMPLE_NAME, 0, splits[0]["train"], 4, dataset_id=921)
    return root


@pytest.mark.slow
def test_trainer_follows_cutoff_schedule_with_equal_real_exposure(example_with_synthetic_fold0, monkeypatch):
    torch.set_num_threads(1)
    trainer = in_process_trainer(example_with_synthetic_fold0, "nnUNetTrainerDiffAug_cutoff50", 0, monkeypatch,
                                  DIFFAUG_SYNTHETIC_RATIO=0.5, DIFFAUG_EQUAL_REAL_EXPOSURE=1)
    started = time.time()
    trainer.run_training()
    elapsed = time.time() - started
    stats = json.loads((Path(trainer.output_folder) / STATS_FILE).read_text())
    # batch size 2, r = 0.5 then 0: exactly one synthetic sample per batch in epoch 0, none in epoch 1
    assert stats["schedule"] == "cutoff:0.5" and stats["ratio"] == 0.5 and stats["equal_real_exposure"] is True
    assert stats["target_ratio_per_epoch"] == [0.5, 0.0]
    assert stats["iterations_per_epoch"] == [6, 3]
    assert stats["synthetic_samples_per_epoch"] == [6, 0]
    assert stats["real_samples_per_epoch"] == [6, 6]
    assert stats["real_samples"] == stats["stock_real_samples"] == 3 * 2 * 2
    assert stats["total_iterations"] == 9 and stats["stock_total_iterations"] == 6
    assert stats["iterations_vs_stock"] == 1.5 and stats["complete"] is True
    assert 0 < stats["wall_time_s"] <= elapsed + 1
    # nnU-Net ran as many optimiser steps as the log says: one train loss per epoch, from 6 and 3 batches
    log = sorted(Path(trainer.output_folder).glob("training_log_*.txt"))[-1].read_text()
    assert re.findall(r"target synthetic share r = ([0-9.]+) \(schedule cutoff:0.5, base r = 0.500\), (\d+) "
                      r"training iterations \(stock 3, equal real exposure\)", log) == [("0.500", "6"), ("0.000", "3")]
    assert re.findall(r"synthetic share drawn this epoch: ([0-9.]+) \((\d+)/(\d+) samples", log) == \
        [("0.500", "6", "12"), ("0.000", "0", "6")]
    assert "9 training iterations (stock budget 6, x1.500); 12 real samples (stock 12), 6 synthetic samples" in log


@pytest.mark.slow
def test_default_trainer_finishes_on_real_data_when_the_fold_has_few_real_cases(planned_example, tmp_path,
                                                                              monkeypatch):
    """The default schedule 'auto': a fold of 2 real training cases trains with the 75 % cut-off."""
    torch.set_num_threads(1)
    source, splits = planned_example
    root = private_copy_of_example(source, tmp_path)
    few = splits[0]["train"][:2]
    (root / "preprocessed" / EXAMPLE_NAME / "splits_final.json").write_text(
        json.dumps(splits + [{"train": few, "val": splits[0]["val"]}]))
    make_stand_in_synthetic_set(root / "raw", EXAMPLE_NAME, 2, few, 4, dataset_id=922)
    trainer = in_process_trainer(root, "nnUNetTrainerDiffAug", 2, monkeypatch, DIFFAUG_NUM_EPOCHS=4,
                                  DIFFAUG_SYNTHETIC_RATIO=0.5)
    trainer.run_training()
    stats = json.loads((Path(trainer.output_folder) / STATS_FILE).read_text())
    assert stats["schedule"] == "cutoff:0.75"
    assert stats["target_ratio_per_epoch"] == [0.5, 0.5, 0.5, 0.0]
    assert stats["synthetic_samples_per_epoch"][3] == 0 and sum(stats["synthetic_samples_per_epoch"][:3]) > 0
    log = sorted(Path(trainer.output_folder).glob("training_log_*.txt"))[-1].read_text()
    assert "DiffAug: schedule auto -> cutoff:0.75 (2 real training case(s)" in log


@pytest.mark.slow
def test_r0_with_a_schedule_trains_like_the_stock_trainer(planned_example, tmp_path, monkeypatch):
    """No synthetic set for fold 1: r = 0 must not look for one, and must repeat stock's losses exactly."""
    torch.set_num_threads(1)
    root = private_copy_of_example(planned_example[0], tmp_path)
    losses, weights = {}, {}
    for name, env in [("nnUNetTrainerBudget", {}),
                      ("nnUNetTrainerDiffAug_linear", {"DIFFAUG_SYNTHETIC_RATIO": 0, "DIFFAUG_EQUAL_REAL_EXPOSURE": 1})]:
        trainer = in_process_trainer(root, name, 1, monkeypatch, **env)
        trainer.run_training()
        losses[name] = [trainer.logger.get_value(key, step=e) for key in ("train_losses", "val_losses")
                        for e in range(2)]
        weights[name] = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    assert losses["nnUNetTrainerDiffAug_linear"] == losses["nnUNetTrainerBudget"]
    stock, ours = weights["nnUNetTrainerBudget"], weights["nnUNetTrainerDiffAug_linear"]
    assert stock.keys() == ours.keys() and all(torch.equal(stock[k], ours[k]) for k in stock)
    stats = json.loads((Path(trainer.output_folder) / STATS_FILE).read_text())
    assert stats["iterations_per_epoch"] == [3, 3] and stats["synthetic_samples"] == 0
    assert stats["real_samples"] == stats["stock_real_samples"] == 12


def test_bad_environment_is_refused_before_training(planned_example, tmp_path, monkeypatch):
    root = private_copy_of_example(planned_example[0], tmp_path)
    with pytest.raises(DiffAugError, match="DIFFAUG_SYNTHETIC_SCHEDULE='cosine'"):
        in_process_trainer(root, "nnUNetTrainerDiffAug", 0, monkeypatch, DIFFAUG_SYNTHETIC_SCHEDULE="cosine")
    with pytest.raises(DiffAugError, match="DIFFAUG_EQUAL_REAL_EXPOSURE='maybe'"):
        in_process_trainer(root, "nnUNetTrainerDiffAug", 0, monkeypatch, DIFFAUG_SYNTHETIC_SCHEDULE="linear",
                            DIFFAUG_EQUAL_REAL_EXPOSURE="maybe")
    trainer = in_process_trainer(root, "nnUNetTrainerDiffAug_equalreal", 0, monkeypatch,
                                  DIFFAUG_SYNTHETIC_SCHEDULE="", DIFFAUG_EQUAL_REAL_EXPOSURE="",
                                  DIFFAUG_SYNTHETIC_RATIO=1)
    with pytest.raises(DiffAugError, match="r < 1"):
        trainer.run_training()
    assert not trainer.was_initialized  # refused before the network, data or synthetic set were touched
