"""Benchmark arms as data: the arm table, shared synthetic sets, resuming (also older workspaces), statistics
and report, with a fake runner that records the commands the benchmark would run."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from nnunet_diffaug.benchmark import (BenchmarkSettings, aggregate, builtin_arm, format_table, load_arms_file,
                                      resolve_arms, run_benchmark)
from nnunet_diffaug.benchmark.arms import STOCK_TRAINER
from nnunet_diffaug.errors import DiffAugError

DATASET = "Dataset500_Toy"
CLASSES = {"background": 0, "liver": 1, "tumour": 2}


# ----------------------------------------------------------------------------------------------
# the arm table
# ----------------------------------------------------------------------------------------------

def test_builtin_arms_name_their_trainer_env_and_synthetic_set():
    stock = builtin_arm("stock")
    assert stock.trainer == STOCK_TRAINER and stock.env == () and stock.synthetic is None
    r33 = builtin_arm("diffaug_r33")
    assert r33.trainer == "nnUNetTrainerDiffAug" and float(dict(r33.env)["DIFFAUG_SYNTHETIC_RATIO"]) == pytest.approx(1 / 3)
    assert (r33.synthetic.generator, r33.synthetic.labels) == ("diffusion", "real")
    combo = dict(builtin_arm("diffaug_r50_cutoff75_equalreal").env)
    assert combo == {"DIFFAUG_SYNTHETIC_RATIO": "0.5", "DIFFAUG_SYNTHETIC_SCHEDULE": "cutoff:0.75",
                     "DIFFAUG_EQUAL_REAL_EXPOSURE": "1"}
    assert dict(builtin_arm("diffaug_r33_linear").env)["DIFFAUG_SYNTHETIC_SCHEDULE"] == "linear"
    # a name without a schedule is a constant share, pinned so that it keeps meaning that whatever the default
    assert dict(r33.env)["DIFFAUG_SYNTHETIC_SCHEDULE"] == "constant"
    assert dict(builtin_arm("diffaug_r33_auto").env)["DIFFAUG_SYNTHETIC_SCHEDULE"] == "auto"
    assert {**dict(builtin_arm("diffaug_r33").env), "DIFFAUG_SYNTHETIC_SCHEDULE": "cutoff:0.5"} == \
        dict(builtin_arm("diffaug_r33_cutoff50").env)
    patchmix = builtin_arm("patchmix")
    assert patchmix.trainer == "nnUNetTrainerDiffAugPatchMix" and patchmix.synthetic.labels == "real-aligned"
    assert dict(builtin_arm("patchmix_alpha80").env) == {"DIFFAUG_PATCHMIX_ALPHA": "0.8"}
    deformed, randomised = builtin_arm("deformed_real_r33"), builtin_arm("randomised_r33")
    assert deformed.env == randomised.env == r33.env  # the controls change only the synthetic source
    assert deformed.synthetic.generator == "deformed-real" and not deformed.synthetic.needs_synthesizer
    assert randomised.synthetic.generator == "randomised" and not randomised.synthetic.needs_synthesizer
    informed = builtin_arm("randomised_informed_r33_equalreal")  # the same painting around real class intensities
    assert informed.env == builtin_arm("randomised_r33_equalreal").env and informed.synthetic.options == (
        ("--class-prior", "real"),) and informed.synthetic.key != builtin_arm("randomised_r33_equalreal").synthetic.key
    assert builtin_arm("randomised_informed_r33_painted") is None  # nothing painted by a diffusion model to keep
    assert builtin_arm("diffaug_r33_generated").synthetic.labels == "generated"
    assert builtin_arm("synthetic_only").name == "diffaug_r100"
    assert builtin_arm("diffaug_r0").synthetic is None  # r = 0 draws no synthetic case
    long_stock = builtin_arm("stock_x150")  # the equal-compute control of diffaug_r33_equalreal
    assert long_stock.trainer == STOCK_TRAINER and dict(long_stock.env) == {"DIFFAUG_ITERATION_SCALE": "1.5"}
    for bad in ("diffaug_r150", "diffaug_r33_cutoff0", "diffaug", "stock_r33", "patchmix_alpha120", "DiffAug_r33",
                "stock_x050", "stock_x15"):
        assert builtin_arm(bad) is None, bad


def test_arm_list_starts_with_stock_folds_aliases_and_refuses_unknown_names_with_the_valid_ones():
    assert [a.name for a in resolve_arms(["diffaug_r33", "synthetic_only", "diffaug_r100", "stock"])] == \
        ["stock", "diffaug_r33", "diffaug_r100"]
    with pytest.raises(DiffAugError, match=r"--arms: unknown arm\(s\) \['diffaug_33', 'mixup'\]\. Valid: stock; "
                                           r"stock_x<PPP>.*diffaug_r<NN>.*patchmix"):
        resolve_arms(["diffaug_r33", "diffaug_33", "mixup"])


def test_arms_file_defines_custom_arms_and_refuses_bad_ones(tmp_path):
    good = tmp_path / "arms.json"
    good.write_text(json.dumps({"heavy_aug": {"trainer": "nnUNetTrainerDA5", "env": {}, "synthetic": None},
                                "diffaug_generated_r25": {"trainer": "nnUNetTrainerDiffAug",
                                                          "env": {"DIFFAUG_SYNTHETIC_RATIO": 0.25},
                                                          "synthetic": {"generator": "diffusion",
                                                                        "labels": "generated"}}}))
    custom = load_arms_file(good)
    arms = resolve_arms(["heavy_aug", "diffaug_generated_r25", "diffaug_r33"], custom)
    assert [a.name for a in arms] == ["stock", "heavy_aug", "diffaug_generated_r25", "diffaug_r33"]
    assert arms[1].trainer == "nnUNetTrainerDA5" and arms[1].synthetic is None
    assert dict(arms[2].env) == {"DIFFAUG_SYNTHETIC_RATIO": "0.25"} and arms[2].synthetic.labels == "generated"
    with pytest.raises(DiffAugError, match="from the arms file: diffaug_generated_r25, heavy_aug"):
        resolve_arms(["nope"], custom)

    cases = {
        "does not exist": None,
        "not valid JSON": "{",
        "unknown key\\(s\\) \\['ratio'\\]": {"a": {"trainer": "X", "ratio": 0.5}},
        "'trainer' must name": {"a": {"env": {}}},
        "DIFFAUG_NUM_EPOCHS": {"a": {"trainer": "X", "env": {"DIFFAUG_NUM_EPOCHS": 5}}},
        "generator 'gan' is not one of": {"a": {"trainer": "X", "synthetic": {"generator": "gan"}}},
        "labels 'fake' is not one of": {"a": {"trainer": "X", "synthetic": {"labels": "fake"}}},
        "is a built-in arm": {"diffaug_r50": {"trainer": "X"}},
        "only letters": {"a/b": {"trainer": "X"}},
    }
    for i, (message, content) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.json"
        if content is not None:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(DiffAugError, match=f"--arms-file {path}.*{message}"):
            load_arms_file(path)


# ----------------------------------------------------------------------------------------------
# the benchmark with a fake runner
# ----------------------------------------------------------------------------------------------

def _user_dataset(root: Path, monkeypatch, n_cases: int = 8) -> None:
    raw = root / "user_raw" / DATASET
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    for i in range(n_cases):
        (raw / "imagesTr" / f"toy_{i:03d}_0000.nii.gz").write_bytes(b"")
        (raw / "labelsTr" / f"toy_{i:03d}.nii.gz").write_bytes(b"")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": CLASSES,
                                                  "numTraining": n_cases, "file_ending": ".nii.gz"}))
    pre = root / "user_preprocessed" / DATASET
    pre.mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text("{}")
    monkeypatch.setenv("nnUNet_raw", str(root / "user_raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "user_preprocessed"))


def _write_summary(fold_dir: Path, dice: float) -> None:
    (fold_dir / "validation").mkdir(parents=True, exist_ok=True)
    (fold_dir / "validation" / "summary.json").write_text(json.dumps(
        {"mean": {"1": {"Dice": dice}, "2": {"Dice": dice - 0.2}}, "foreground_mean": {"Dice": dice - 0.1}}))


class FakeRunner:
    """Records every command; 'trains' an arm by writing its summary.json (Dice from ``dice[arm]``)."""

    def __init__(self, dice: dict):
        self.dice = dice
        self.calls = []

    def __call__(self, cmd, env):
        self.calls.append((Path(cmd[0]).name, cmd, env))
        if Path(cmd[0]).name == "nnUNetv2_train":
            dataset, config, fold, trainer = cmd[1], cmd[2], int(cmd[3]), cmd[cmd.index("-tr") + 1]
            arm = Path(env["nnUNet_results"]).name
            fold_dir = Path(env["nnUNet_results"]) / dataset / f"{trainer}__{cmd[cmd.index('-p') + 1]}__{config}" / f"fold_{fold}"
            _write_summary(fold_dir, self.dice[arm] + 0.01 * fold)
            if env.get("DIFFAUG_EQUAL_REAL_EXPOSURE") == "1":
                total = int(env["DIFFAUG_NUM_EPOCHS"]) * int(env["DIFFAUG_ITERATIONS_PER_EPOCH"]) * 3 // 2
                (fold_dir / "diffaug_training_stats.json").write_text(json.dumps({"total_iterations": total}))

    def named(self, script):
        return [(cmd, env) for name, cmd, env in self.calls if name == script]

    def trained(self):
        return [(Path(env["nnUNet_results"]).name, int(cmd[3])) for cmd, env in self.named("nnUNetv2_train")]


def _flag(cmd, flag):
    return cmd[cmd.index(flag) + 1]


def test_arms_sharing_a_synthetic_set_make_it_once_and_each_arm_gets_its_set(tmp_path, monkeypatch):
    _user_dataset(tmp_path, monkeypatch)
    monkeypatch.setenv("DIFFAUG_SYNTHETIC_SCHEDULE", "linear")  # left in the user's shell: must not leak into arms
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # (the test session sets it)
    s = BenchmarkSettings(dataset=DATASET, train_sizes=(3,), seeds=(0,), epochs=4, iterations=5,
                          arms=("diffaug_r33", "diffaug_r33_cutoff50", "diffaug_r50_equalreal", "patchmix",
                                "deformed_real_r33", "randomised_r33", "randomised_informed_r33"))
    runner = FakeRunner({"randomised_informed_r33": 0.55, "stock": 0.6, "diffaug_r33": 0.65, "diffaug_r33_cutoff50": 0.62,
                         "diffaug_r50_equalreal": 0.7, "patchmix": 0.6, "deformed_real_r33": 0.63,
                         "randomised_r33": 0.5})
    results = run_benchmark(s, tmp_path / "ws", runner=runner)

    synth = runner.named("diffaug_synthesize")
    kinds = sorted((c[c.index("--generator") + 1] if "--generator" in c else "diffusion", _flag(c, "--labels"))
                   for c, _ in synth)
    assert kinds == [("deformed-real", "real"), ("diffusion", "real"), ("diffusion", "real-aligned"),
                     ("randomised", "real"), ("randomised", "real")]  # four arms share the diffusion set: made once
    priors = [_flag(c, "--class-prior") if "--class-prior" in c else "uniform" for c, _ in synth if "randomised" in c]
    assert sorted(priors) == ["real", "uniform"]  # the informed set is its own, told its prior
    ids = [int(_flag(c, "--output-dataset")) for c, _ in synth]
    assert len(set(ids)) == 5 and all(i >= 900 for i in ids)
    assert len(runner.named("diffaug_train_synthesizer")) == 1  # trained once per fold, only for diffusion sets
    sets = {Path(env["nnUNet_results"]).name: env.get("DIFFAUG_SYNTHETIC_DATASET") for _, env in
            runner.named("nnUNetv2_train")}
    assert sets["stock"] is None
    assert sets["diffaug_r33"] == sets["diffaug_r33_cutoff50"] == sets["diffaug_r50_equalreal"]
    assert len({sets["diffaug_r33"], sets["patchmix"], sets["deformed_real_r33"], sets["randomised_r33"],
                sets["randomised_informed_r33"]}) == 5
    aligned = next(int(_flag(c, "--output-dataset")) for c, _ in synth if _flag(c, "--labels") == "real-aligned")
    assert sets["patchmix"] == f"Dataset{aligned:03d}_ToySynthF0"
    envs = {Path(env["nnUNet_results"]).name: env for _, env in runner.named("nnUNetv2_train")}
    assert "DIFFAUG_SYNTHETIC_SCHEDULE" not in envs["stock"]
    assert envs["diffaug_r33"]["DIFFAUG_SYNTHETIC_SCHEDULE"] == "constant"  # not the shell's 'linear'
    assert "DIFFAUG_SYNTHETIC_SCHEDULE" not in envs["patchmix"]
    assert envs["diffaug_r33_cutoff50"]["DIFFAUG_SYNTHETIC_SCHEDULE"] == "cutoff:0.5"
    for env in envs.values():  # same budget and seed for every arm
        assert (env["DIFFAUG_NUM_EPOCHS"], env["DIFFAUG_ITERATIONS_PER_EPOCH"], env["DIFFAUG_SEED"]) == ("4", "5", "0")
    assert all(env["OMP_WAIT_POLICY"] == "PASSIVE" for _, _, env in runner.calls)  # no spinning OpenMP threads

    rows = {r["arm"]: r for r in results["aggregate"]}
    assert rows["diffaug_r50_equalreal"]["iterations_vs_stock"] == pytest.approx(1.5)
    assert rows["diffaug_r33"]["iterations_vs_stock"] == pytest.approx(1.0)
    assert rows["randomised_r33"]["difference_vs_stock"] == pytest.approx(-0.1)
    assert all(r["wall_time_min"] is not None for r in rows.values())
    assert (tmp_path / "ws" / "benchmark_plot.png").stat().st_size > 1000

    # rerun with the same arms: nothing runs
    again = FakeRunner(runner.dice)
    run_benchmark(s, tmp_path / "ws", runner=again)
    assert again.calls == []


def test_only_controls_without_a_trained_synthesizer(tmp_path, monkeypatch):
    _user_dataset(tmp_path, monkeypatch)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's own setting wins over the CPU default
    s = BenchmarkSettings(dataset=DATASET, train_sizes=(3,), seeds=(0, 1), arms=("deformed_real_r33",))
    runner = FakeRunner({"stock": 0.6, "deformed_real_r33": 0.6})
    run_benchmark(s, tmp_path / "ws", runner=runner)
    assert runner.named("diffaug_train_synthesizer") == []
    assert {env["OMP_WAIT_POLICY"] for _, _, env in runner.calls} == {"ACTIVE"}
    assert [_flag(c, "-f") for c, _ in runner.named("diffaug_synthesize")] == ["0", "1"]  # one set per fold


def _legacy_workspace(root: Path, monkeypatch) -> tuple[Path, BenchmarkSettings]:
    """A workspace as the first version of the benchmark left it: stock and diffaug_r33 trained on fold 0,
    the synthesizer's set in raw/ (found by provenance, no registry), no arm or timing files."""
    from nnunet_diffaug.benchmark.workspace import draw_subsets, make_workspace
    _user_dataset(root, monkeypatch)
    ws = root / "ws"
    make_workspace(ws, DATASET, root / "user_raw", root / "user_preprocessed")
    s = BenchmarkSettings(dataset=DATASET, train_sizes=(3,), seeds=(0,), epochs=4, iterations=5)
    cases = [f"toy_{i:03d}" for i in range(8)]
    _, folds = draw_subsets(cases, s)
    (ws / "preprocessed" / DATASET / "splits_final.json").write_text(
        json.dumps([{"train": f["train"], "val": f["val"]} for f in folds]))
    old = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("arms", "arms_file")}
    old.update(ratios=[1 / 3], synthetic_only=False)
    (ws / "benchmark_settings.json").write_text(json.dumps(old))
    for arm, trainer, dice in (("stock", "nnUNetTrainerBudget", 0.6), ("diffaug_r33", "nnUNetTrainerDiffAug", 0.7)):
        _write_summary(ws / "results" / arm / DATASET / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0", dice)
    legacy_set = ws / "raw" / "Dataset900_ToySynthF0"
    legacy_set.mkdir()
    (legacy_set / "diffaug_provenance.json").write_text(json.dumps(
        {"source_dataset": DATASET, "fold": 0, "configuration": "3d_fullres", "training_cases": folds[0]["train"],
         "generator": {"kind": "label_conditioned_latent_diffusion", "label_mode": "real"}, "seed": 0}))
    return ws, s


def test_an_older_workspace_resumes_training_only_the_added_arms_and_seeds(tmp_path, monkeypatch):
    ws, s = _legacy_workspace(tmp_path, monkeypatch)
    runner = FakeRunner({"stock": 0.6, "diffaug_r33": 0.7, "patchmix": 0.66, "diffaug_r50": 0.68})
    results = run_benchmark(dataclasses.replace(s, arms=("diffaug_r33", "patchmix", "diffaug_r50")), ws, runner=runner)
    assert runner.trained() == [("patchmix", 0), ("diffaug_r50", 0)]  # stock and diffaug_r33 are not retrained
    synth = {_flag(c, "--labels"): _flag(c, "--output-dataset") for c, _ in runner.named("diffaug_synthesize")}
    # the new arms take new calibrated sets: the older run's set (id 900) was painted without calibration
    assert synth == {"real-aligned": "901", "real": "902"}
    assert all("--calibrate-intensity" in c for c, _ in runner.named("diffaug_synthesize"))
    envs = {Path(env["nnUNet_results"]).name: env for _, env in runner.named("nnUNetv2_train")}
    assert envs["diffaug_r50"]["DIFFAUG_SYNTHETIC_DATASET"] == "Dataset902_ToySynthF0"
    assert envs["patchmix"]["DIFFAUG_SYNTHETIC_DATASET"] == "Dataset901_ToySynthF0"
    rows = {r["arm"]: r for r in results["aggregate"]}
    assert rows["diffaug_r33"]["difference_vs_stock"] == pytest.approx(0.1)
    assert rows["stock"]["wall_time_min"] is None  # trained before the benchmark timed arms, no nnU-Net log here
    assert rows["patchmix"]["wall_time_min"] is not None

    # a seed added later: every arm trains on the new fold only, the shared sets of fold 0 are not remade
    more = FakeRunner(runner.dice)
    run_benchmark(dataclasses.replace(s, seeds=(0, 1), arms=("diffaug_r33", "patchmix", "diffaug_r50")), ws,
                  runner=more)
    assert more.trained() == [("stock", 1), ("diffaug_r33", 1), ("patchmix", 1), ("diffaug_r50", 1)]
    assert sorted(_flag(c, "-f") for c, _ in more.named("diffaug_synthesize")) == ["1", "1", "1"]
    # diffaug_r33 keeps the meaning it was trained with here (painted), the arms added later are calibrated
    real_sets = {_flag(c, "--output-dataset"): "--no-calibrate-intensity" in c for c, _ in more.named("diffaug_synthesize")
                 if _flag(c, "--labels") == "real"}
    envs = {Path(env["nnUNet_results"]).name: env for _, env in more.named("nnUNetv2_train")}
    assert real_sets[envs["diffaug_r33"]["DIFFAUG_SYNTHETIC_DATASET"][7:10]] is True    # painted
    assert real_sets[envs["diffaug_r50"]["DIFFAUG_SYNTHETIC_DATASET"][7:10]] is False   # calibrated
    assert len(more.named("diffaug_train_synthesizer")) == 1

    # a budget change is still refused; a custom arm reusing a trained arm's name for something else too
    with pytest.raises(DiffAugError, match="epochs 4 -> 8"):
        run_benchmark(dataclasses.replace(s, epochs=8), ws, runner=FakeRunner({}))
    arms_file = tmp_path / "arms.json"
    arms_file.write_text(json.dumps({"patchmix_v2": {"trainer": "nnUNetTrainerDiffAugPatchMix"}}))
    run_benchmark(dataclasses.replace(s, arms=("patchmix_v2",), arms_file=str(arms_file)), ws,
                  runner=FakeRunner({"stock": 0.6, "patchmix_v2": 0.5}))
    arms_file.write_text(json.dumps({"patchmix_v2": {"trainer": "nnUNetTrainerDiffAugPatchMix",
                                                     "env": {"DIFFAUG_PATCHMIX_ALPHA": 0.8}}}))
    with pytest.raises(DiffAugError, match="trained arm 'patchmix_v2' as .* rename the custom arm"):
        run_benchmark(dataclasses.replace(s, arms=("patchmix_v2",), arms_file=str(arms_file)), ws,
                      runner=FakeRunner({}))


def _workspace_with_arms(tmp_path, monkeypatch, dice: dict):
    """A workspace where stock and the arms of ``dice`` trained one seed; returns it, its settings and record."""
    _user_dataset(tmp_path, monkeypatch)
    ws = tmp_path / "ws"
    s = BenchmarkSettings(dataset=DATASET, train_sizes=(3,), seeds=(0,), epochs=4, iterations=5, arms=tuple(dice))
    run_benchmark(s, ws, runner=FakeRunner({"stock": 0.6, **dice}))
    return ws, s, json.loads((ws / "benchmark_arms.json").read_text())


def test_a_workspace_that_trained_painted_diffusion_arms_keeps_them_painted(tmp_path, monkeypatch, capsys):
    """Before calibration was diffaug_synthesize's default, workspaces recorded diffusion arms without it: adding
    a seed there must train diffaug_r33 on painted cases again, not mix calibrated ones into its rows."""
    ws, s, recorded = _workspace_with_arms(tmp_path, monkeypatch, {"diffaug_r33": 0.7, "diffaug_r50": 0.65})
    assert recorded["diffaug_r33"]["synthetic"]["options"] == {"--calibrate-intensity": ""}
    # rewrite the record as an earlier version left it: diffaug_r33's set as painted
    recorded["diffaug_r33"]["synthetic"].pop("options")
    (ws / "benchmark_arms.json").write_text(json.dumps(recorded))
    more = FakeRunner({"stock": 0.6, "diffaug_r33": 0.7, "diffaug_r50": 0.65})
    run_benchmark(dataclasses.replace(s, seeds=(0, 1)), ws, runner=more)
    assert "'diffaug_r33' was defined here with synthetic cases as painted" in capsys.readouterr().out
    commands = {Path(env["nnUNet_results"]).name: env["DIFFAUG_SYNTHETIC_DATASET"]
                for _, env in more.named("nnUNetv2_train") if "DIFFAUG_SYNTHETIC_DATASET" in env}
    painted = {_flag(c, "--output-dataset"): "--no-calibrate-intensity" in c for c, _ in more.named("diffaug_synthesize")}
    assert painted == {commands["diffaug_r33"][7:10]: True, commands["diffaug_r50"][7:10]: False}
    assert json.loads((ws / "benchmark_arms.json").read_text())["diffaug_r33"] == recorded["diffaug_r33"]


def test_arms_recorded_before_the_auto_default_keep_their_constant_share(tmp_path, monkeypatch):
    """Workspaces recorded diffaug_r33 without a schedule while the trainer's default was a constant share: adding
    a seed there trains it with a constant share again (the trainer's default is now 'auto')."""
    ws, s, recorded = _workspace_with_arms(tmp_path, monkeypatch, {"diffaug_r33": 0.7, "diffaug_r33_auto": 0.72})
    assert recorded["diffaug_r33_auto"]["env"]["DIFFAUG_SYNTHETIC_SCHEDULE"] == "auto"
    recorded["diffaug_r33"]["env"].pop("DIFFAUG_SYNTHETIC_SCHEDULE")  # as an earlier version recorded it
    (ws / "benchmark_arms.json").write_text(json.dumps(recorded))
    more = FakeRunner({"stock": 0.6, "diffaug_r33": 0.7, "diffaug_r33_auto": 0.72})
    run_benchmark(dataclasses.replace(s, seeds=(0, 1)), ws, runner=more)
    assert more.trained() == [("stock", 1), ("diffaug_r33", 1), ("diffaug_r33_auto", 1)]
    schedules = {Path(env["nnUNet_results"]).name: env.get("DIFFAUG_SYNTHETIC_SCHEDULE")
                 for _, env in more.named("nnUNetv2_train")}
    assert schedules == {"stock": None, "diffaug_r33": "constant", "diffaug_r33_auto": "auto"}
    assert json.loads((ws / "benchmark_arms.json").read_text())["diffaug_r33"]["env"]["DIFFAUG_SYNTHETIC_SCHEDULE"] == \
        "constant"
    # only names that mean a constant share read a record without a schedule as constant
    recorded = json.loads((ws / "benchmark_arms.json").read_text())
    recorded["diffaug_r33_auto"]["env"].pop("DIFFAUG_SYNTHETIC_SCHEDULE")
    (ws / "benchmark_arms.json").write_text(json.dumps(recorded))
    with pytest.raises(DiffAugError, match="trained arm 'diffaug_r33_auto' as"):
        run_benchmark(dataclasses.replace(s, seeds=(0, 1)), ws, runner=FakeRunner({}))


def test_unknown_arm_is_refused_before_the_workspace_is_made(tmp_path, monkeypatch):
    _user_dataset(tmp_path, monkeypatch)
    with pytest.raises(DiffAugError, match="unknown arm"):
        run_benchmark(BenchmarkSettings(dataset=DATASET, arms=("diffaug_r33", "bogus")), tmp_path / "ws",
                      runner=FakeRunner({}))
    assert not (tmp_path / "ws").exists()


# ----------------------------------------------------------------------------------------------
# statistics and report
# ----------------------------------------------------------------------------------------------

def _runs(values: dict, wall: dict | None = None, iterations: dict | None = None):
    return [{"arm": arm, "trainer": builtin_arm(arm).trainer, "n_train": 3, "seed": seed, "mean_foreground_dice": v,
             "dice": {"liver": v, "tumour": v / 2}, "wall_time_s": (wall or {}).get(arm),
             "total_iterations": (iterations or {}).get(arm, 100)}
            for arm, vs in values.items() for seed, v in enumerate(vs)]


def test_longer_trained_arms_are_also_paired_with_the_stock_arm_trained_as_long():
    arms = ["stock", "diffaug_r33_equalreal", "stock_x150", "diffaug_r33"]
    values = {"stock": [0.60, 0.55, 0.70], "diffaug_r33_equalreal": [0.68, 0.66, 0.72],
              "stock_x150": [0.66, 0.60, 0.73], "diffaug_r33": [0.61, 0.57, 0.69]}
    runs = _runs(values, iterations={"diffaug_r33_equalreal": 148, "stock_x150": 152})  # 37 vs 38 per epoch
    rows = {r["arm"]: r for r in aggregate(runs, arms)}
    equal = rows["diffaug_r33_equalreal"]
    assert equal["equal_compute_stock_arm"] == "stock_x150"
    assert equal["difference_vs_equal_compute_stock"] == pytest.approx(
        np.mean(np.subtract(values["diffaug_r33_equalreal"], values["stock_x150"])))
    assert equal["equal_compute_paired_t_p_value"] == pytest.approx(
        stats.ttest_rel(values["diffaug_r33_equalreal"], values["stock_x150"]).pvalue)
    # arms at stock's budget, and the stock arms themselves, have no equal-compute partner
    assert all("equal_compute_stock_arm" not in rows[a] for a in ("stock", "stock_x150", "diffaug_r33"))
    table = format_table({"classes": ["liver", "tumour"], "aggregate": list(rows.values())})
    assert "Δ vs equal-compute stock (p)" in table.splitlines()[0]
    assert "+0.023 vs stock_x150 (p " in next(line for line in table.splitlines() if "r33_equalreal" in line)
    plain = format_table({"classes": ["liver", "tumour"], "aggregate": aggregate(runs, ["stock", "diffaug_r33"])})
    assert "equal-compute" not in plain  # no such column where no arm has a partner


def test_synthetic_arms_are_paired_with_the_deformed_real_control_that_mixes_the_same_way():
    arms = ["stock", "diffaug_r33", "deformed_real_r33", "randomised_r33", "diffaug_r50", "diffaug_r33_equalreal",
            "diffaug_r33_equalreal_painted", "deformed_real_r33_equalreal"]
    values = {"stock": [0.60, 0.55, 0.70], "diffaug_r33": [0.64, 0.60, 0.71], "deformed_real_r33": [0.62, 0.61, 0.69],
              "randomised_r33": [0.50, 0.52, 0.58], "diffaug_r50": [0.65, 0.61, 0.70],
              "diffaug_r33_equalreal": [0.70, 0.66, 0.74], "diffaug_r33_equalreal_painted": [0.66, 0.60, 0.70],
              "deformed_real_r33_equalreal": [0.69, 0.63, 0.75]}
    rows = {r["arm"]: r for r in aggregate(_runs(values), arms, {a: builtin_arm(a).to_json() for a in arms})}
    expected = {"diffaug_r33": "deformed_real_r33", "randomised_r33": "deformed_real_r33",
                "diffaug_r33_equalreal": "deformed_real_r33_equalreal",
                "diffaug_r33_equalreal_painted": "deformed_real_r33_equalreal"}
    assert {a: r["control_arm"] for a, r in rows.items() if "control_arm" in r} == expected  # r50 has none
    for arm, control in expected.items():
        assert rows[arm]["difference_vs_control"] == pytest.approx(np.mean(np.subtract(values[arm], values[control])))
        assert rows[arm]["control_paired_t_p_value"] == pytest.approx(
            stats.ttest_rel(values[arm], values[control]).pvalue)
    table = format_table({"classes": ["liver", "tumour"], "aggregate": list(rows.values())})
    assert "Δ vs deformed-real control (p)" in table.splitlines()[0]
    assert "| -0.107 vs deformed_real_r33 (p " in next(line for line in table.splitlines() if "randomised" in line)
    without = format_table({"classes": ["liver", "tumour"], "aggregate": aggregate(_runs(values), arms)})
    assert "control" not in without  # arm definitions unknown: no pairing is guessed from names


def _case(tp_fp_fn: dict) -> dict:
    return {"metrics": {k: {"TP": tp, "FP": fp, "FN": fn, "n_ref": tp + fn, "n_pred": tp + fp}
                        for k, (tp, fp, fn) in tp_fp_fn.items()}}


def test_pooled_dice_is_not_swung_by_stray_voxels_of_a_class_a_test_case_lacks():
    from nnunet_diffaug.benchmark.report import pooled_dice
    labels = {"1": "liver", "2": "tumour"}
    # case 2 has no tumour: 3 stray voxels make nnU-Net's per-case Dice 0 there (none would make it NaN, left out)
    summary = {"metric_per_case": [_case({"1": (900, 50, 50), "2": (95, 5, 0)}), _case({"1": (800, 0, 100),
                                                                                     "2": (0, 3, 0)})]}
    pooled = pooled_dice(summary, labels)
    assert pooled["liver"] == pytest.approx(2 * 1700 / (2 * 1700 + 50 + 150))
    assert pooled["tumour"] == pytest.approx(2 * 95 / (2 * 95 + 8))  # 0.96, where the per-case mean is 0.49
    assert pooled_dice({"metric_per_case": []}, labels) is None  # older summaries: no counts, no pooled Dice

    # the pooled reading is the table's headline, and the paired comparisons are made in it too
    arms = ["stock", "stock_x150", "diffaug_r33_equalreal"]
    runs = _runs({"stock": [0.60, 0.55, 0.70], "stock_x150": [0.62, 0.57, 0.70],
                  "diffaug_r33_equalreal": [0.66, 0.58, 0.71]},
                 iterations={"stock_x150": 152, "diffaug_r33_equalreal": 148})
    pooled_values = {"stock": [0.80, 0.75, 0.85], "stock_x150": [0.81, 0.78, 0.85],
                     "diffaug_r33_equalreal": [0.82, 0.79, 0.86]}
    for r in runs:
        v = pooled_values[r["arm"]][r["seed"]]
        r["pooled_mean_foreground_dice"], r["pooled_dice"] = v, {"liver": v + 0.05, "tumour": v - 0.05}
    rows = {r["arm"]: r for r in aggregate(runs, arms)}
    equal = rows["diffaug_r33_equalreal"]
    assert equal["pooled_mean_foreground_dice"] == pytest.approx(np.mean([0.82, 0.79, 0.86]))
    assert equal["pooled_per_class_mean"]["liver"] == pytest.approx(np.mean([0.87, 0.84, 0.91]))
    assert equal["pooled_difference_vs_stock"] == pytest.approx(np.mean([0.02, 0.04, 0.01]))
    assert equal["pooled_paired_t_p_value"] == pytest.approx(
        stats.ttest_rel([0.82, 0.79, 0.86], [0.80, 0.75, 0.85]).pvalue)
    assert equal["pooled_difference_vs_equal_compute_stock"] == pytest.approx(np.mean([0.01, 0.01, 0.01]))
    assert equal["difference_vs_equal_compute_stock"] == pytest.approx(np.mean([0.04, 0.01, 0.01]))  # per case
    lines = format_table({"classes": ["liver", "tumour"], "aggregate": list(rows.values())}).splitlines()
    assert lines[0].startswith("| n_train | arm | seeds | fg Dice (± sd) | liver | tumour | Δ vs stock (p) |")
    assert "| per-case fg Dice (± sd) | per-case Δ vs stock (p) |" in lines[0]
    assert lines[4].startswith("| 3 | diffaug_r33_equalreal | 3 | 0.823 ± 0.035 | 0.873 ± 0.035 | 0.773 ± 0.035 "
                               "| +0.023 (p 0.118) | +0.010 vs stock_x150 |")
    assert "| 0.650 ± 0.066 | +0.033 (p " in lines[4]  # nnU-Net's per-case mean, next to it
    assert lines[-1].startswith("Dice: pooled over the held-out cases")
    # without the counts (older summaries) the table falls back to nnU-Net's per-case mean and says so
    plain = format_table({"classes": ["liver", "tumour"], "aggregate": aggregate(_runs({"stock": [0.6, 0.7]}),
                                                                                  ["stock"])}).splitlines()
    assert "per-case" not in plain[0] and plain[-1].startswith("Dice: nnU-Net's per-case Dice, mean over")


def test_paired_difference_and_p_value_match_scipy_and_one_seed_has_neither_p_nor_sd():
    stock, arm = [0.61, 0.55, 0.70, 0.64], [0.66, 0.58, 0.71, 0.70]
    rows = {r["arm"]: r for r in aggregate(_runs({"stock": stock, "patchmix": arm}), ["stock", "patchmix"])}
    assert rows["patchmix"]["difference_vs_stock"] == pytest.approx(np.mean(np.subtract(arm, stock)))
    assert rows["patchmix"]["paired_t_p_value"] == pytest.approx(stats.ttest_rel(arm, stock).pvalue)
    assert rows["patchmix"]["n_seeds"] == 4 and rows["patchmix"]["sd"] == pytest.approx(np.std(arm, ddof=1))
    tumour = rows["patchmix"]["per_class_difference_vs_stock"]["tumour"]
    assert tumour["difference"] == pytest.approx(np.mean(np.subtract(arm, stock)) / 2)
    assert tumour["paired_t_p_value"] == pytest.approx(stats.ttest_rel(np.divide(arm, 2), np.divide(stock, 2)).pvalue)
    one = {r["arm"]: r for r in aggregate(_runs({"stock": [0.6], "patchmix": [0.7]}), ["stock", "patchmix"])}
    assert one["patchmix"]["difference_vs_stock"] == pytest.approx(0.1)
    assert one["patchmix"]["paired_t_p_value"] is None and one["patchmix"]["sd"] is None
    assert one["patchmix"]["per_class_sd"] == {"liver": None, "tumour": None}


def test_table_has_a_row_per_arm_with_seeds_wall_time_and_iterations(tmp_path):
    from nnunet_diffaug.benchmark import write_report
    arms = ["stock", "diffaug_r33", "deformed_real_r33"]
    runs = _runs({"stock": [0.6, 0.62], "diffaug_r33": [0.65, 0.66], "deformed_real_r33": [0.6, 0.64]},
                 wall={"stock": 120.0, "diffaug_r33": 180.0, "deformed_real_r33": 150.0})
    results = {"settings": {"dataset": DATASET, "configuration": "3d_fullres"}, "classes": ["liver", "tumour"],
               "aggregate": aggregate(runs, arms)}
    lines = format_table(results).splitlines()
    assert "wall min" in lines[0] and "iterations vs stock" in lines[0] and "Δ vs stock (p)" in lines[0]
    body = {line.split(" | ")[1]: line for line in lines[2:] if line.startswith("|")}
    assert list(body) == arms
    assert "| 3 | diffaug_r33 | 2 | 0.655 ± 0.007 |" in body["diffaug_r33"]
    assert " 3.0 | 1.00× |" in body["diffaug_r33"] and " 2.0 | 1.00× |" in body["stock"]
    assert "+0.045" in body["diffaug_r33"]
    write_report(results, tmp_path)  # one training-set size: grouped bars per class
    png = tmp_path / "benchmark_plot.png"
    assert png.stat().st_size > 1000
    import matplotlib.image
    assert matplotlib.image.imread(png).shape[1] >= 600
    assert json.loads((tmp_path / "benchmark_results.json").read_text())["aggregate"][1]["wall_time_min"] == 3.0


def test_demo_explains_that_small_one_seed_differences_are_noise():
    from nnunet_diffaug.demo import explain_noise
    results = {"test_cases": ["a", "b", "c"], "runs": [{"seed": 0, "n_train": 5}],
               "aggregate": [{"arm": "stock"}, {"arm": "diffaug_r33", "difference_vs_stock": -0.002},
                             {"arm": "patchmix", "difference_vs_stock": 0.09},
                             {"arm": "diffaug_r33_equalreal", "difference_vs_stock": 0.12,
                              "equal_compute_stock_arm": "stock_x150", "difference_vs_equal_compute_stock": 0.01}]}
    text = explain_noise(results)
    assert "1 seed and 3 test cases, differences below about 0.05 Dice are noise" in text
    assert "diffaug_r33: -0.002 (within the noise)" in text and "patchmix: +0.090 (larger" in text
    assert "--seeds 0 1 2 3 4" in text
    # an arm that trains longer is judged against stock trained as long, not only against stock
    assert "diffaug_r33_equalreal vs stock_x150 (stock nnU-Net trained as long, the fair comparison): +0.010 " \
           "(within the noise)" in text
    # with pooled Dice in every row (nnU-Net's summaries have the counts), the verdict is made in pooled Dice
    for row, pooled in zip(results["aggregate"], (0.8, 0.79, 0.82, 0.81)):
        row.update({"pooled_mean_foreground_dice": pooled, "pooled_difference_vs_stock": round(pooled - 0.8, 3)})
    results["aggregate"][3]["pooled_difference_vs_equal_compute_stock"] = -0.07
    text = explain_noise(results)
    assert "'fg Dice' is Dice pooled over the held-out cases" in text
    assert "diffaug_r33: -0.010 (within the noise)" in text and "patchmix: +0.020 (within the noise)" in text
    assert "the fair comparison): -0.070 (larger than one seed's noise, but still one seed)" in text


def test_a_judged_arm_filters_its_set_with_the_folds_stock_model_trained_first(tmp_path, monkeypatch):
    _user_dataset(tmp_path, monkeypatch)
    s = BenchmarkSettings(dataset=DATASET, train_sizes=(3,), seeds=(0,), epochs=4, iterations=5, n_synthetic=6,
                          arms=("diffaug_r33", "diffaug_r33_judged"))
    runner = FakeRunner({"stock": 0.6, "diffaug_r33": 0.62, "diffaug_r33_judged": 0.66})
    run_benchmark(s, tmp_path / "ws", runner=runner)
    synth = runner.named("diffaug_synthesize")
    judged = [c for c, _ in synth if "--judge" in c]
    assert len(synth) == 2 and len(judged) == 1  # the plain and the judged set are two sets
    judge = Path(_flag(judged[0], "--judge"))
    assert judge.parent.parent.name == "stock" and judge.name.startswith("nnUNetTrainerBudget__")
    assert _flag(judged[0], "--candidates") == "12"
    order = [name for name, *_ in runner.calls]
    first_stock = next(i for i, (name, cmd, env) in enumerate(runner.calls)
                       if name == "nnUNetv2_train" and Path(env["nnUNet_results"]).name == "stock")
    judged_call = next(i for i, (name, cmd, env) in enumerate(runner.calls) if "--judge" in cmd)
    assert first_stock < judged_call, order
    sets = {Path(env["nnUNet_results"]).name: env.get("DIFFAUG_SYNTHETIC_DATASET") for _, env in
            runner.named("nnUNetv2_train")}
    assert sets["diffaug_r33"] != sets["diffaug_r33_judged"]


def test_inpaint_arms_and_synthesis_options_from_an_arms_file_reach_diffaug_synthesize(tmp_path, monkeypatch):
    from nnunet_diffaug.benchmark.arms import builtin_arm
    assert builtin_arm("diffaug_r33_inpaint").synthetic.labels == "inpaint"
    assert builtin_arm("deformed_real_r33_inpaint") is None  # only the diffusion model repaints a region
    _user_dataset(tmp_path, monkeypatch)
    arms_file = tmp_path / "arms.json"
    arms_file.write_text(json.dumps({"inpaint_spine": {
        "trainer": "nnUNetTrainerDiffAug", "env": {"DIFFAUG_SYNTHETIC_RATIO": 0.33},
        "synthetic": {"generator": "diffusion", "labels": "inpaint",
                      "options": {"--classes": "spine", "--edit": "move,scale", "--margin": 3}}},
        "calibrated": {"trainer": "nnUNetTrainerDiffAug", "env": {"DIFFAUG_SYNTHETIC_RATIO": 0.33},
                       "synthetic": {"generator": "diffusion", "labels": "real",
                                     "options": {"--calibrate-intensity": ""}}},
        "as_painted": {"trainer": "nnUNetTrainerDiffAug", "env": {"DIFFAUG_SYNTHETIC_RATIO": 0.5},
                       "synthetic": {"generator": "diffusion", "labels": "real",
                                     "options": {"--no-calibrate-intensity": ""}}}}))
    s = BenchmarkSettings(dataset=DATASET, train_sizes=(3,), seeds=(0,), epochs=4, iterations=5,
                          arms=("inpaint_spine", "calibrated", "diffaug_r33", "as_painted", "diffaug_r33_painted"),
                          arms_file=str(arms_file))
    runner = FakeRunner({"stock": 0.6, "inpaint_spine": 0.61, "calibrated": 0.63, "diffaug_r33": 0.62,
                         "as_painted": 0.5, "diffaug_r33_painted": 0.55})
    run_benchmark(s, tmp_path / "ws", runner=runner)
    inpaint = [c for c, _ in runner.named("diffaug_synthesize") if _flag(c, "--labels") == "inpaint"]
    assert len(inpaint) == 1
    assert (_flag(inpaint[0], "--classes"), _flag(inpaint[0], "--edit"), _flag(inpaint[0], "--margin")) == \
        ("spine", "move,scale", "3")
    # calibration is diffaug_synthesize's default: the custom calibrated arm shares diffaug_r33's set, and the
    # painted arms (custom --no-calibrate-intensity and built-in _painted) share another; valueless flags pass alone
    real = [c for c, _ in runner.named("diffaug_synthesize") if _flag(c, "--labels") == "real"]
    assert sorted("--calibrate-intensity" in c for c in real) == [False, True]
    assert sorted("--no-calibrate-intensity" in c for c in real) == [False, True]
    for flag in ("--calibrate-intensity", "--no-calibrate-intensity"):
        flagged = next(c for c in real if flag in c)
        assert flagged[flagged.index(flag) + 1:][:1] != [""]
    envs = {Path(env["nnUNet_results"]).name: env["DIFFAUG_SYNTHETIC_DATASET"]
            for _, env in runner.named("nnUNetv2_train") if "DIFFAUG_SYNTHETIC_DATASET" in env}
    assert envs["calibrated"] == envs["diffaug_r33"] != envs["as_painted"] == envs["diffaug_r33_painted"]
    assert builtin_arm("deformed_real_r33_painted") is None  # only diffusion cases are painted
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": {"trainer": "nnUNetTrainerDiffAug",
                                     "synthetic": {"labels": "inpaint", "options": {"--epochs": 3}}}}))
    with pytest.raises(DiffAugError, match="synthetic 'options' must map diffaug_synthesize flags"):
        run_benchmark(dataclasses.replace(s, arms=("x",), arms_file=str(bad)), tmp_path / "ws2", runner=runner)
