"""A tiny benchmark run on CPU: report files, values in range, and both arms provably on equal terms."""
import dataclasses
import json
import re

import numpy as np
import pytest

from nnunet_diffaug.benchmark import (BenchmarkSettings, aggregate, check_same_arm_settings, draw_subsets,
                                      format_table)
from nnunet_diffaug.benchmark.arms import builtin_arm, load_arms_file
from nnunet_diffaug.benchmark.run import train_env
from nnunet_diffaug.errors import DiffAugError
from support import EXAMPLE_ID, EXAMPLE_NAME, console_script, nnunet_env, run

# a synthesizer small enough for a test: a few dozen steps (the loss-drop and label-following
# behaviour of real presets is tested in test_synthesis_*.py)
MICRO_SYNTHESIZER = {"base": "tiny", "autoencoder": {"steps": 15}, "diffusion": {"steps": 15, "scale_factor_batches": 2},
                     "checkpoint_every": 15, "montage_cases": 2}


def test_subsets_are_fixed_disjoint_from_the_test_set_and_nested_by_seed():
    cases = [f"c{i:02d}" for i in range(12)]
    s = BenchmarkSettings(dataset="X", train_sizes=(2, 5, "all"), seeds=(0, 1), test_fraction=0.25)
    test, folds = draw_subsets(cases, s)
    assert len(test) == 3 and all(f["val"] == test for f in folds)
    assert all(not set(f["train"]) & set(test) for f in folds)
    assert [(f["seed"], f["n_train"]) for f in folds] == [(0, 2), (0, 5), (0, 9), (1, 2), (1, 5), (1, 9)]
    assert folds[0]["train"] != folds[3]["train"]  # seeds draw different subsets
    assert draw_subsets(cases, s) == (test, folds)  # and always the same ones
    # more seeds later: the finished folds keep their index and subset (nothing is retrained)
    _, more = draw_subsets(cases, BenchmarkSettings(dataset="X", train_sizes=(2, 5, "all"), seeds=(0, 1, 2),
                                                    test_fraction=0.25))
    assert more[:len(folds)] == folds and len(more) == 9


def test_paired_difference_and_test_across_seeds():
    runs = []
    for seed, (stock, diffaug) in enumerate([(0.50, 0.60), (0.40, 0.55), (0.45, 0.52)]):
        for arm, v in (("stock", stock), ("diffaug_r33", diffaug)):
            runs.append({"arm": arm, "n_train": 2, "seed": seed, "mean_foreground_dice": v, "dice": {"a": v}})
    rows = {r["arm"]: r for r in aggregate(runs, ["stock", "diffaug_r33"])}
    assert rows["diffaug_r33"]["difference_vs_stock"] == pytest.approx(np.mean([0.10, 0.15, 0.07]))
    assert 0 < rows["diffaug_r33"]["paired_t_p_value"] < 0.05
    assert rows["stock"]["sd"] == pytest.approx(np.std([0.5, 0.4, 0.45], ddof=1))
    # one seed: no spread and no test, and the table says so instead of printing ± 0.000
    one = aggregate([r for r in runs if r["seed"] == 0], ["stock", "diffaug_r33"])
    assert one[0]["sd"] is None and one[1]["paired_t_p_value"] is None
    table = format_table({"classes": ["a"], "aggregate": one})
    assert "0.500 (1 seed)" in table and "±" not in table.split("\n", 2)[2] and "+0.100" in table


def test_a_workspace_refuses_arms_of_another_budget_but_takes_more_seeds_and_ratios(tmp_path):
    settings_file = tmp_path / "benchmark_settings.json"
    s = BenchmarkSettings(dataset="X", epochs=60, iterations=25)
    check_same_arm_settings(settings_file, s)  # a new workspace takes anything
    settings_file.write_text(json.dumps(dataclasses.asdict(s)))
    check_same_arm_settings(settings_file, dataclasses.replace(s, seeds=(0, 1, 2, 3), arms=("diffaug_r10", "diffaug_r33")))
    for change in ({"epochs": 200}, {"iterations": 50}, {"synthesizer_preset": "default"}, {"n_synthetic": 40},
                   {"mirroring": False}):
        with pytest.raises(DiffAugError, match=f"{next(iter(change))} .* -> .*new workspace"):
            check_same_arm_settings(settings_file, dataclasses.replace(s, **change))
    # a workspace recorded before --no-mirroring existed trained with nnU-Net's mirroring: it resumes as such
    older = {k: v for k, v in dataclasses.asdict(s).items() if k != "mirroring"}
    settings_file.write_text(json.dumps(older))
    check_same_arm_settings(settings_file, s)


def test_no_mirroring_reaches_every_arm_and_no_arm_can_change_it(tmp_path):
    s = BenchmarkSettings(dataset="X", mirroring=False)
    for name in ("stock", "diffaug_r33", "stock_x150", "patchmix"):
        assert train_env(s, builtin_arm(name), 0, None)["DIFFAUG_MIRRORING"] == 0
    assert train_env(BenchmarkSettings(dataset="X"), builtin_arm("stock"), 0, None)["DIFFAUG_MIRRORING"] == 1
    arms_file = tmp_path / "arms.json"
    arms_file.write_text(json.dumps({"flipless": {"trainer": "nnUNetTrainerBudget", "env": {"DIFFAUG_MIRRORING": 0}}}))
    with pytest.raises(DiffAugError, match=r"sets \['DIFFAUG_MIRRORING'\]"):
        load_arms_file(arms_file)
    table = format_table({"settings": dataclasses.asdict(s), "classes": ["a"],
                          "aggregate": [{"n_train": 2, "arm": "stock", "n_seeds": 1, "mean_foreground_dice": 0.5,
                                         "sd": None, "per_class_mean": {"a": 0.5}}]})
    assert table.endswith("without nnU-Net's mirroring (--no-mirroring).")


@pytest.mark.slow
def test_tiny_benchmark_run(planned_example, tmp_path):
    root, _ = planned_example
    config = tmp_path / "micro_synthesizer.json"
    config.write_text(json.dumps(MICRO_SYNTHESIZER))
    out = tmp_path / "bench"
    env = nnunet_env(root)
    cmd = [console_script("diffaug_benchmark"), "-d", str(EXAMPLE_ID), "-c", "3d_fullres", "-o", str(out),
           "--train-sizes", "2", "--seeds", "0", "--test-fraction", "0.25", "--epochs", "2", "--iterations", "4",
           "--n-synthetic", "2", "--synthesizer-preset", str(config), "--sampler", "ddim", "--steps", "3",
           "--small-plans", "-device", "cpu"]
    run(cmd, env)

    results = json.loads((out / "benchmark_results.json").read_text())
    assert (out / "benchmark_plot.png").stat().st_size > 1000
    table = (out / "benchmark_table.md").read_text()
    assert "| 2 | stock |" in table and "| 2 | diffaug_r33_auto |" in table
    classes = ["ribs", "spine", "right_lung", "left_lung", "soft_tissue"]
    assert results["classes"] == classes
    assert len(results["runs"]) == 2
    for r in results["runs"]:
        assert 0.0 <= r["mean_foreground_dice"] <= 1.0
        assert set(r["dice"]) == set(classes)
        assert all(np.isnan(v) or 0.0 <= v <= 1.0 for v in r["dice"].values())

    # both arms of a fold: same subset, same seed, same held-out cases, same budget (one seed is enough here:
    # that every seed draws its own subset, disjoint from the test cases, is test_subsets_are_fixed_...)
    splits = json.loads((out / "preprocessed" / EXAMPLE_NAME / "splits_final.json").read_text())
    for fold in (0,):
        pair = [r for r in results["runs"] if r["fold"] == fold]
        assert {r["arm"] for r in pair} == {"stock", "diffaug_r33_auto"}
        assert pair[0]["train_cases"] == pair[1]["train_cases"] == splits[fold]["train"]
        assert pair[0]["seed"] == pair[1]["seed"]
        budgets = []
        for arm, trainer in (("stock", "nnUNetTrainerBudget"), ("diffaug_r33_auto", "nnUNetTrainerDiffAug")):
            fold_dir = (out / "results" / arm / EXAMPLE_NAME / f"{trainer}__nnUNetPlansDiffAugSmall__3d_fullres"
                        / f"fold_{fold}")
            debug = json.loads((fold_dir / "debug.json").read_text())
            budgets.append((debug["num_epochs"], debug["num_iterations_per_epoch"], debug["batch_size"]))
            log = sorted(fold_dir.glob("training_log_*.txt"))[-1].read_text()
            assert re.search(r"This split has 2 training and 2 validation cases", log)
            if arm != "stock":  # the default arm is the trainer's default: with 2 real cases, finish on real data
                assert "DiffAug: schedule auto -> cutoff:0.75 (2 real training case(s)" in log
            validated = sorted(p.name[:-7] for p in (fold_dir / "validation").glob("*.nii.gz"))
            assert validated == sorted(splits[fold]["val"])
        assert budgets[0] == budgets[1] == ("2", "4", "2") or budgets[0] == budgets[1] == (2, 4, 2)
        # the synthesizer of this fold saw exactly the fold's training subset
        synthetic = [p for p in (out / "raw").iterdir() if (p / "diffaug_provenance.json").is_file()]
        provs = [json.loads((p / "diffaug_provenance.json").read_text()) for p in synthetic]
        prov = next(p for p in provs if p["fold"] == fold)
        assert sorted(prov["training_cases"]) == sorted(splits[fold]["train"])

    # resumable: a rerun retrains nothing
    finals = {p: p.stat().st_mtime_ns for p in (out / "results").rglob("checkpoint_final.pth")}
    assert len(finals) == 2
    run(cmd, env)
    assert {p: p.stat().st_mtime_ns for p in (out / "results").rglob("checkpoint_final.pth")} == finals

    # a rerun with another budget would mix budgets in one table: refused, nothing changed
    longer = cmd[:cmd.index("--epochs") + 1] + ["3"] + cmd[cmd.index("--epochs") + 2:]
    proc = run(longer, env, expect_ok=False)
    assert proc.returncode == 2 and "epochs 2 -> 3" in proc.stderr and "new workspace" in proc.stderr
    assert json.loads((out / "benchmark_settings.json").read_text())["epochs"] == 2
