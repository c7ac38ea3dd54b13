"""Runs the benchmark: each step a console script, as a user would run it, in the workspace's nnU-Net folders.

For every fold (training subset x seed) and every unfinished arm: the synthetic sets the arms need are
made once (the diffusion synthesizer is trained only if one of them needs it), then each arm trains
with the same budget and seed and is scored by nnU-Net's own final validation on the held-out cases.
A finished arm (its ``summary.json`` exists) is never retrained, so a workspace resumes, and adding an
arm or a seed trains only what is new.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

from nnunet_diffaug import paths
from nnunet_diffaug.paths import console_script
from nnunet_diffaug.benchmark.arms import CONSISTENCY, CONTEXT, Arm, SyntheticSpec, builtin_arm
from nnunet_diffaug.benchmark.report import collect_results, write_report
from nnunet_diffaug.benchmark.settings import (BenchmarkSettings, check_arm_definitions, check_same_arm_settings,
                                               keep_recorded_meaning, settings_arms)
from nnunet_diffaug.benchmark.workspace import (SyntheticSets, check_inputs, draw_subsets, fold_folder, make_workspace,
                                                record_timing, summary_file, unlabeled_remainder, write_splits)
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import atomic_write_json
from nnunet_diffaug.raw_dataset import list_cases, load_dataset_json
from nnunet_diffaug.shared_cpu import set_shared_cpu_defaults
from nnunet_diffaug.trainer_discovery import ensure_trainer_discoverable
from nnunet_diffaug import env_vars
from nnunet_diffaug.trainers.mirroring import side_labels_note

SMALL_PLANS = "nnUNetPlansDiffAugSmall"
CommandRunner = Callable[[list, dict], None]


class SubprocessRunner:
    """Runs one step, its output appended to the workspace's log (or shown with verbose)."""

    def __init__(self, log: Path, verbose: bool):
        self.log = log
        self.verbose = verbose

    def __call__(self, cmd: list[str], env: dict) -> None:
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.run(cmd, env=env, stdout=None if self.verbose else log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise DiffAugError(f"'{' '.join(cmd)}' failed (exit {proc.returncode}); see {self.log}.")


def step_env(workdir: Path, results: str, extra: dict) -> dict:
    """The environment of one step: the workspace's nnU-Net folders, our trainers, and only the DIFFAUG_
    variables this step sets (one left in the user's shell would change some arms and not others)."""
    env = set_shared_cpu_defaults({k: v for k, v in os.environ.items() if not k.startswith("DIFFAUG_")})
    env.update({"nnUNet_raw": str(workdir / "raw"), "nnUNet_preprocessed": str(workdir / "preprocessed"),
                "nnUNet_results": str(workdir / "results" / results),
                "nnUNet_extTrainer": ensure_trainer_discoverable()})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def synthesizer_command(s: BenchmarkSettings, fold: int, seed: int, unlabeled: Path | None = None,
                        preset: str | None = None) -> list[str]:
    """``unlabeled``: the fold's unlabelled remainder (``_unlabeled`` arms); ``preset``: a config file in place of
    the settings' preset (``_context`` and ``_consistency`` arms)."""
    cmd = [console_script("diffaug_train_synthesizer"), "-d", s.dataset, "-f", str(fold), "-c", s.configuration,
           "-device", s.device, "--seed", str(seed), "--preset", preset or s.synthesizer_preset, "-p", s.plans]
    return cmd + (["--unlabeled", str(unlabeled)] if unlabeled is not None else [])


def synthesizer_results(spec: SyntheticSpec) -> str:
    """The results folder of the synthesizer a set needs: its own for one that also saw unlabelled images,
    conditions on context or trains with the segmentation-consistency loss."""
    return ("synthesizer" + ("_unlabeled" if spec.unlabeled else "") + ("_context" if spec.context else "")
            + ("_consistency" if spec.consistency else ""))


def stock_model_folder(workdir: Path, s: BenchmarkSettings) -> Path:
    """The stock arm's nnU-Net model folder (fold_<f> inside for each fold): the judge of _judged sets and of the
    _consistency arms' synthesizers, trained on the same real subset before them."""
    return fold_folder(workdir, builtin_arm("stock"), s.dataset, s.plans, s.configuration, 0).parent


def variant_preset(workdir: Path, s: BenchmarkSettings, spec: SyntheticSpec) -> Path | None:
    """The settings' synthesizer preset with the _context arms' "context" block and / or the _consistency arms'
    "consistency" block (judge: the stock arm's model), written into the workspace; None for the plain preset."""
    if not spec.context and not spec.consistency:
        return None
    from nnunet_diffaug.synthesis.config import load_config
    config = load_config(s.synthesizer_preset).to_json()
    if spec.context:
        config["context"] = {**config["context"], **CONTEXT}
    if spec.consistency:
        config["consistency"] = {**config["consistency"], **CONSISTENCY,
                                 "judge": str(stock_model_folder(workdir, s))}
    path = workdir / ("synthesizer" + ("_context" if spec.context else "")
                      + ("_consistency" if spec.consistency else "") + ".json")
    atomic_write_json(path, config)
    return path


def synthesize_command(s: BenchmarkSettings, fold: int, seed: int, spec: SyntheticSpec, dataset_name: str,
                       judge: Path | None = None) -> list[str]:
    """``judge``: the model folder that filters a ``_judged`` set (the fold's stock arm)."""
    cmd = [console_script("diffaug_synthesize"), "-d", s.dataset, "-f", str(fold), "-c", s.configuration,
           "-device", s.device, "--seed", str(seed), "-n", str(s.n_synthetic), "--labels", spec.labels,
           "--output-dataset", str(int(dataset_name[7:10]))]
    if spec.generator == "diffusion":  # the default generator: no flag, as the first benchmark version ran it
        cmd += ["--sampler", s.sampler, "--steps", str(s.steps)]
    else:  # no synthesizer: the generator reads the preprocessed data of the benchmark's plans
        cmd += ["--generator", spec.generator, "-p", s.plans]
    if spec.generator == "diffusion" and not spec.calibrated:
        cmd += ["--no-calibrate-intensity"]  # diffaug_synthesize calibrates by default
    if spec.judge:
        # a ranking needs no test-time mirroring (up to 8x faster in 3D); every judged set was measured without it
        cmd += ["--judge", str(judge), "--candidates", str(2 * s.n_synthetic), "--disable_tta"]
    for flag, value in spec.options:
        cmd += [flag, *value.split()]  # nargs flags (--volume) take space-separated values
    return cmd


def train_command(s: BenchmarkSettings, arm: Arm, fold: int) -> list[str]:
    # a killed run leaves checkpoint_latest.pth: --c continues it instead of starting over
    return [console_script("nnUNetv2_train"), s.dataset, s.configuration, str(fold), "-tr", arm.trainer, "-p", s.plans,
            "-device", s.device, "--c"]


def train_env(s: BenchmarkSettings, arm: Arm, seed: int, synthetic_dataset: str | None) -> dict:
    env = {env_vars.NUM_EPOCHS: s.epochs, env_vars.ITERATIONS_PER_EPOCH: s.iterations,
           env_vars.VAL_ITERATIONS: s.val_iterations, env_vars.SEED: seed, env_vars.MIRRORING: int(s.mirroring),
           **dict(arm.env)}
    if synthetic_dataset is not None:
        env[env_vars.SYNTHETIC_DATASET] = synthetic_dataset
    return env


def _use_small_plans(workdir: Path, s: BenchmarkSettings) -> BenchmarkSettings:
    from nnunet_diffaug.small_plans import write_small_plans
    if not (workdir / "preprocessed" / s.dataset / f"{SMALL_PLANS}.json").is_file():
        old = os.environ.get("nnUNet_preprocessed")
        os.environ["nnUNet_preprocessed"] = str(workdir / "preprocessed")
        try:
            write_small_plans(s.dataset, s.plans, SMALL_PLANS)
        finally:
            os.environ["nnUNet_preprocessed"] = old
    return dataclasses.replace(s, plans=SMALL_PLANS)


def run_benchmark(settings: BenchmarkSettings, workdir: str | os.PathLike, verbose: bool = False,
                  runner: CommandRunner | None = None) -> dict:
    """Runs what is missing in the workspace and reports every arm; ``runner`` runs one command (tests
    pass a recorder)."""
    from tqdm import tqdm
    s = settings
    arms = settings_arms(s)  # unknown arms and bad arm files are refused before anything is written
    check_inputs(s.dataset, s.plans, paths.nnunet_raw(), paths.nnunet_preprocessed())
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    make_workspace(workdir, s.dataset, paths.nnunet_raw(), paths.nnunet_preprocessed())
    pre = workdir / "preprocessed" / s.dataset
    if s.small_plans:
        s = _use_small_plans(workdir, s)
    if not (pre / f"{s.plans}.json").is_file():
        raise DiffAugError(f"{pre / (s.plans + '.json')} does not exist: plan and preprocess {s.dataset} first.")
    check_same_arm_settings(workdir / "benchmark_settings.json", s)
    arms = keep_recorded_meaning(workdir / "benchmark_arms.json", arms)
    definitions = check_arm_definitions(workdir / "benchmark_arms.json", arms)

    dataset_json = load_dataset_json(workdir / "raw" / s.dataset)
    cases = sorted(list_cases(workdir / "raw" / s.dataset, dataset_json))
    note = side_labels_note(dataset_json.get("labels", {}), s.mirroring)
    if note:
        print(f"Note: {note}")
    _, folds = draw_subsets(cases, s)
    remainders = {}  # checked before anything runs: no test case's image may reach a synthesizer
    if any(a.synthetic is not None and a.synthetic.unlabeled for a in arms):
        remainders = {i: unlabeled_remainder(workdir, s.dataset, i, f) for i, f in enumerate(folds)}
    write_splits(pre / "splits_final.json", folds)
    atomic_write_json(workdir / "benchmark_settings.json", dataclasses.asdict(s))
    atomic_write_json(workdir / "benchmark_arms.json", definitions)

    run = runner or SubprocessRunner(workdir / "benchmark_log.txt", verbose)
    sets = SyntheticSets(workdir, s.dataset)
    todo = [(fold, arm) for fold in range(len(folds)) for arm in arms
            if not summary_file(workdir, arm, s.dataset, s.plans, s.configuration, fold).is_file()]
    made_synthesizer: set[tuple[int, tuple]] = set()
    for fold, arm in tqdm(todo, desc="Benchmark arms", unit="arm"):
        seed = folds[fold]["seed"]
        synthetic = None
        if arm.synthetic is not None:
            synthetic = sets.name(fold, arm.synthetic)
            if not sets.is_complete(fold, arm.synthetic):  # made once per fold, shared by the arms using it
                results = synthesizer_results(arm.synthetic)
                variant = (fold, arm.synthetic.synthesizer_variant)
                if arm.synthetic.needs_synthesizer and variant not in made_synthesizer:
                    preset = variant_preset(workdir, s, arm.synthetic)
                    run(synthesizer_command(s, fold, seed, remainders.get(fold) if arm.synthetic.unlabeled else None,
                                            None if preset is None else str(preset)),
                        step_env(workdir, results, {}))  # resumes itself
                    made_synthesizer.add(variant)
                # a judged set's judge is the fold's stock arm: trained first, on the same real subset
                run(synthesize_command(s, fold, seed, arm.synthetic, synthetic, stock_model_folder(workdir, s)),
                    step_env(workdir, results, {}))
                sets.mark_complete(fold, arm.synthetic)
        start = time.monotonic()
        run(train_command(s, arm, fold), step_env(workdir, arm.name, train_env(s, arm, seed, synthetic)))
        # our own clock: the stock trainer reports no time, and every arm is timed the same way
        record_timing(workdir, arm, fold, time.monotonic() - start)

    results = collect_results(workdir, s, folds, arms)
    write_report(results, workdir)
    return results
