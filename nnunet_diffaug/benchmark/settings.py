"""What a benchmark is: its settings, which of them define a finished arm, and the arms they name."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from nnunet_diffaug.benchmark.arms import (DEFAULT_ARMS, Arm, builtin_arm, load_arms_file,
                                          ratio_arm_name, resolve_arms)
from nnunet_diffaug import env_vars
from nnunet_diffaug.errors import DiffAugError


@dataclasses.dataclass
class BenchmarkSettings:
    dataset: str                         # e.g. Dataset990_ChestCTSlabs (in the user's nnU-Net folders)
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    train_sizes: tuple = (2, 5, "all")
    seeds: tuple = (0, 1, 2)
    test_fraction: float = 0.3           # held-out real cases, fixed across sizes and seeds
    test_cases: tuple = ()               # or named explicitly
    epochs: int = 50
    iterations: int = 50
    val_iterations: int = 5
    arms: tuple = DEFAULT_ARMS           # arm names (see arms.py); stock is always run
    arms_file: str | None = None         # JSON file of custom arms
    n_synthetic: int = 20
    synthesizer_preset: str = "tiny"
    sampler: str = "dpmpp"
    steps: int = 20
    device: str = "cpu"
    small_plans: bool = False            # write and use a small plans copy in the workspace (CPU runs)
    mirroring: bool = True               # nnU-Net's mirroring (training and inference), off for labels with sides


# Settings that define what a finished arm IS: a workspace whose arms were trained under other values
# would mix budgets or synthesizers in one table, so such a rerun is refused. Seeds and the arm list may
# grow (an arm's own definition is checked by name, see check_arm_definitions).
ARM_DEFINING_SETTINGS = ("dataset", "configuration", "plans", "epochs", "iterations", "val_iterations",
                         "n_synthetic", "synthesizer_preset", "sampler", "steps", "mirroring")


def settings_arms(s: BenchmarkSettings) -> list[Arm]:
    """The arms these settings name (stock included), checked against the built-in grammar and the arms file."""
    return resolve_arms(list(s.arms), load_arms_file(s.arms_file) if s.arms_file else None)


def check_same_arm_settings(settings_file: Path, s: BenchmarkSettings) -> None:
    if not settings_file.is_file():
        return
    before = json.loads(settings_file.read_text())
    now = dataclasses.asdict(s)
    changed = [f"{k} {before[k]!r} -> {now[k]!r}" for k in ARM_DEFINING_SETTINGS if k in before and before[k] != now[k]]
    if changed:
        raise DiffAugError(f"{settings_file.parent} holds arms trained with other settings ({'; '.join(changed)}): "
                           f"their results would be mixed into one table. Use a new workspace folder (-o).")


def _with_pinned_schedule(recorded: dict) -> dict:
    """Built-in mixing arms were recorded without a schedule while the trainer's default was a constant share;
    they are now recorded with it, so the same name keeps its meaning (and its definition compares equal)."""
    upgraded = {}
    for name, definition in recorded.items():
        arm = builtin_arm(name)
        pinned = None if arm is None else dict(arm.env).get(env_vars.SYNTHETIC_SCHEDULE)
        if (pinned == "constant" and definition.get("trainer") == arm.trainer
                and env_vars.SYNTHETIC_SCHEDULE not in definition.get("env", {})):
            definition = {**definition, "env": {**definition.get("env", {}), env_vars.SYNTHETIC_SCHEDULE: pinned}}
        upgraded[name] = definition
    return upgraded


def _recorded_definitions(arms_file: Path) -> dict:
    """The arm definitions a workspace recorded; a workspace of the first benchmark versions recorded only its
    settings (built-in arms, named by --ratios / --arms), and every diffusion set then was as painted."""
    if arms_file.is_file():
        return _with_pinned_schedule(json.loads(arms_file.read_text()))
    settings_file = arms_file.parent / "benchmark_settings.json"
    if not settings_file.is_file():
        return {}
    old = json.loads(settings_file.read_text())
    names = [*old.get("arms", ()), *(ratio_arm_name(r) for r in old.get("ratios", ())),
             *(["synthetic_only"] if old.get("synthetic_only") else [])]
    arms = [builtin_arm(name) for name in names]
    return {arm.name: arm.as_painted().to_json() for arm in arms if arm is not None}


def keep_recorded_meaning(arms_file: Path, arms: list[Arm]) -> list[Arm]:
    """Arms that a workspace trained before diffusion sets were calibrated by default (recorded as painted, now
    defined as calibrated) keep the painted meaning in that workspace, so new seeds or sizes never mix the two."""
    known = _recorded_definitions(arms_file)
    kept = []
    for arm in arms:
        if (arm.name in known and arm.synthetic is not None and arm.synthetic.calibrated
                and known[arm.name] == arm.as_painted().to_json()):
            print(f"{arms_file.parent}: arm {arm.name!r} was defined here with synthetic cases as painted (before "
                  f"per-class intensity calibration was the default) and keeps that meaning in this workspace; "
                  f"for the calibrated arm use a new workspace (-o) or an arms file with another name.")
            arm = arm.as_painted()
        kept.append(arm)
    return kept


def check_arm_definitions(arms_file: Path, arms: list[Arm]) -> dict:
    """Refuses an arm whose name the workspace already used for another trainer, env or synthetic set;
    returns every definition the workspace has seen (earlier arms stay recorded when not rerun)."""
    known = _with_pinned_schedule(json.loads(arms_file.read_text())) if arms_file.is_file() else {}
    for arm in arms:
        if arm.name in known and known[arm.name] != arm.to_json():
            raise DiffAugError(f"{arms_file.parent} trained arm {arm.name!r} as {known[arm.name]}, now defined as "
                               f"{arm.to_json()}: rename the custom arm, or use a new workspace folder (-o).")
    return {**known, **{a.name: a.to_json() for a in arms}}
