"""Segmentation-consistency loss: the painter is trained to paint what a real-trained nnU-Net of the fold reads.

The judge is the ``judged_example`` fixture's tiny 3d_fullres nnU-Net (4 epochs on fold 0's real slabs; of the
example's classes it reads soft tissue, Dice 0.81 on the validation slabs, and none of the others yet). Two
synthesizers are trained for the module, identical (same autoencoder file, seed, batches and noise) except for the
loss; their difference is what the loss did. The 2d path gets its own pair and a tiny 2d judge (``root_2d``).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from support import (EXAMPLE_ID, EXAMPLE_NAME, JUDGE, RecordingRunner, console_script, nnunet_env, nnunet_folders,
                     judge_trained_with_synthetic_cases, judge_validated_on_another_split,
                     private_copy_of_example, toy_benchmark_dataset, train_tiny_judge)

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import file_sha256
from nnunet_diffaug.judge_filter import BLIND_CLASS_DICE, Judge, judge_validation_dice
from nnunet_diffaug.paths import synthesizer_folder
from nnunet_diffaug.provenance import read_provenance
from nnunet_diffaug.raw_dataset import load_dataset_json
from nnunet_diffaug.synthesis.autoencoder import encode_mean
from nnunet_diffaug.synthesis.checkpoint import read_state
from nnunet_diffaug.synthesis.config import SynthesizerConfig, load_config
from nnunet_diffaug.synthesis.consistency import ConsistencyLoss
from nnunet_diffaug.synthesis.data import DataSpec, FoldData, PatchSampler
from nnunet_diffaug.synthesis.outside_data import provenance_entries
from nnunet_diffaug.synthesis.synthesizer import Synthesizer
from nnunet_diffaug.synthesis.training import _prepare_folder, train_synthesizer

pytestmark = pytest.mark.slow
TRAINER, PLANS, CONFIG = JUDGE
SOFT_TISSUE = 5          # the one class this judge reads
WEIGHT = 5.0             # strong enough to show within 80 CPU steps
DIFFUSION_STEPS = 80


def _config(judge: Path | None = None, autoencoder_steps: int = 60, diffusion: dict | None = None,
            **consistency) -> SynthesizerConfig:
    obj = {"base": "tiny", "autoencoder": {"steps": autoencoder_steps},
           "diffusion": {"steps": DIFFUSION_STEPS, "scale_factor_batches": 4, **(diffusion or {})},
           "checkpoint_every": 20, "montage_cases": 2}
    if judge is not None:
        obj["consistency"] = {"judge": str(judge), "weight": WEIGHT, "max_timestep": 1000, **consistency}
    return SynthesizerConfig.from_json(obj)


def _train(config: SynthesizerConfig, configuration: str = CONFIG, **kwargs) -> Path:
    return train_synthesizer(EXAMPLE_ID, configuration, 0, config, plans_identifier=PLANS, device="cpu", seed=0,
                             progress=False, **kwargs)


def _judge_folder(root: Path) -> Path:
    return root / "results" / EXAMPLE_NAME / f"{TRAINER}__{PLANS}__{CONFIG}"


def _with_autoencoder(folder: Path, autoencoder_file: Path) -> None:
    """Starts a synthesizer folder from a finished autoencoder (same config and seed: the same weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(autoencoder_file, folder / "autoencoder.safetensors")


@pytest.fixture(scope="module")
def root(judged_example, tmp_path_factory):
    with nnunet_folders(private_copy_of_example(judged_example, tmp_path_factory.mktemp("consistency"),
                                                with_results=True)) as dst:
        yield dst


def _train_pair(configuration: str, judge: Path) -> tuple[Path, Path]:
    """(without, with): fold 0's synthesizer trained without and with the consistency loss, identical otherwise
    (the second starts from the first's autoencoder file; same seed, batches and noise)."""
    folder = synthesizer_folder(EXAMPLE_NAME, configuration, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both runs reduce floats in the same order, whatever the number of workers
    try:
        _train(_config(), configuration)
        without = folder.parent / "without_consistency"
        folder.rename(without)
        _with_autoencoder(folder, without / "autoencoder.safetensors")
        _train(_config(judge), configuration)
    finally:
        torch.set_num_threads(threads)
    return without, folder


@pytest.fixture(scope="module")
def pair(root):
    """(without, with): the same synthesizer trained without and with the consistency loss (SPADE, 3d_fullres)."""
    return _train_pair(CONFIG, _judge_folder(root))


# ---------------------------------------------------------------------------------------------- config

def test_bad_values_are_refused_and_configs_without_the_block_load_and_resume(tmp_path):
    cases = [({"weight": -1}, "consistency.weight must be a finite number >= 0"),
             ({"weight": 1}, "consistency.weight > 0 needs consistency.judge"),
             ({"judge": "/x/model"}, "consistency.weight is 0, which turns the loss off"),
             ({"judge": "/x/model", "weight": 1, "max_timestep": 0}, r"max_timestep must lie in \(0, "),
             ({"judge": "/x/model", "weight": 1, "max_timestep": 1001}, "max_timestep must lie in"),
             ({"judge": "/x/model", "weight": 1, "every": 0}, "consistency.every must be >= 1"),
             ({"judge": 3, "weight": 1}, "consistency.judge must be the path"),
             ({"judge": "/x/model", "weight": 1, "max_step": 3}, r"unknown key\(s\) \['max_step'\]")]
    for block, message in cases:
        with pytest.raises(DiffAugError, match=message):
            SynthesizerConfig.from_json({"base": "tiny", "consistency": block}, "my.json")
    assert not load_config("tiny").consistency.enabled and not load_config("default").consistency.enabled
    # an older synthesizer's config.json (no "consistency" key) resumes as before: the block is off
    old = load_config("tiny").to_json()
    del old["consistency"]
    assert not SynthesizerConfig.from_json(old).consistency.enabled
    spec = DataSpec("Dataset999_X", "2d", "nnUNetPlans", 0, ["a"], 2, 1, [0, 1], ["ZScoreNormalization"], [-2.0],
                    [2.0], [32, 32])
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "synthesizer.json").write_text(json.dumps({"spec": spec.to_json(), "seed": 0}))
    _prepare_folder(tmp_path, load_config("tiny"), spec, 0, overwrite=False)  # no refusal: the same run
    assert "consistency" not in json.loads((tmp_path / "config.json").read_text())  # nothing rewritten


# ---------------------------------------------------------------------------------------------- training

def test_the_loss_is_logged_beside_the_diffusion_loss_and_falls(pair, root):
    _, folder = pair
    losses = read_state(folder / "diffusion.safetensors")["losses"]
    consistency = losses["consistency"]
    assert len(consistency) == len(losses["mse"]) == DIFFUSION_STEPS
    assert all(v is not None and np.isfinite(v) for v in consistency)   # max_timestep 1000: every step
    first, last = np.mean(consistency[:15]), np.mean(consistency[-15:])
    print(f"consistency loss: first 15 steps {first:.3f}, last 15 {last:.3f}")
    assert last < first - 0.03
    log = (folder / "training_log.txt").read_text()
    assert "segmentation-consistency loss x 5" in log and "consistency first" in log
    # the classes this 4-epoch judge does not read on its validation cases are named in the log, the others not
    dice = judge_validation_dice(Judge(_judge_folder(root)), 0, load_dataset_json(root / "raw" / EXAMPLE_NAME))
    note = next((line for line in log.splitlines() if "barely reads" in line), "")
    print("judge's validation Dice:", dice)
    assert all((f"{n} (Dice" in note) == (d < BLIND_CLASS_DICE) for n, d in dice.items())
    assert (folder / "diffusion_losses.png").is_file()
    assert "consistency" not in read_state(pair[0] / "diffusion.safetensors")["losses"]   # off: not logged


def _loaded(folder: Path, loss_folder: Path) -> tuple[Synthesizer, ConsistencyLoss]:
    """The synthesizer in ``folder`` and the consistency loss of the run in ``loss_folder`` (its judge)."""
    syn = Synthesizer.load(folder, torch.device("cpu"))
    entry = json.loads((loss_folder / "synthesizer.json").read_text())["consistency"]
    judge = ConsistencyLoss(load_config(str(loss_folder / "config.json")), syn.spec, entry, syn.autoencoder,
                            syn.train_scheduler, torch.device("cpu"))
    return syn, judge


def _fixed_batch_losses(syn: Synthesizer, judge: ConsistencyLoss, configuration: str,
                        on_batch=None) -> list[float]:
    """The consistency loss of ``syn`` on fixed batches of the fold's training cases at fixed timesteps;
    ``on_batch(images, labels, seed)`` is called for each batch."""
    patches = PatchSampler(FoldData(EXAMPLE_ID, configuration, 0, PLANS), syn.spec.patch_size, 0.67)
    losses = []
    with torch.no_grad():
        for seed in range(4):
            images, labels, _ = patches.batch_with_cases(np.random.default_rng(100 + seed), 8)
            z = encode_mean(syn.autoencoder, images) * syn.scale_factor
            for t_value in (50, 300):
                noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
                t = torch.full((len(z),), t_value, dtype=torch.long)
                noisy = syn.train_scheduler.add_noise(z, noise, t)
                out = syn.model(noisy, t, syn.condition(labels))
                losses.append(float(judge(noisy, out, t, labels, syn.scale_factor, torch.ones(len(z), dtype=torch.bool))))
            if on_batch is not None:
                on_batch(images, labels, seed)
    return losses


def _judge_reading(folder: Path, loss_folder: Path) -> tuple[list[float], list[float]]:
    """(the consistency loss on fixed batches at fixed timesteps, the judge's soft-tissue Dice on images sampled
    for fixed label maps of the fold's training cases), for the synthesizer in ``folder``."""
    syn, judge = _loaded(folder, loss_folder)
    dice = []

    def read_painted(images, labels, seed):
        painted = syn.generate(labels[:, 0].numpy(), syn.sampler(), torch.Generator().manual_seed(seed))
        read = judge.judge_logits(torch.from_numpy(painted)).argmax(1) == SOFT_TISSUE
        truth = judge.lut[labels[:, 0]] == SOFT_TISSUE
        dice.append(float(2 * (read & truth).sum() / (read.sum() + truth.sum())))

    return _fixed_batch_losses(syn, judge, CONFIG, read_painted), dice


def test_trained_with_the_loss_the_judge_reads_its_painted_cases_better(pair, root):
    without, with_loss = pair
    loss_off, dice_off = _judge_reading(without, with_loss)
    loss_on, dice_on = _judge_reading(with_loss, with_loss)
    print(f"fixed-batch consistency loss without {np.round(loss_off, 3)}, with {np.round(loss_on, 3)}")
    print(f"judge soft-tissue Dice on painted crops without {np.round(dice_off, 3)}, with {np.round(dice_on, 3)}")
    # what the loss optimises, on batches it never trained on: lower for every batch and timestep
    assert all(on < off for on, off in zip(loss_on, loss_off))
    # and what it is for: the judge reads the painted images better (measured: +0.008-0.019 on each of 4
    # sampling seeds, mean +0.015; small, as 80 CPU steps are)
    assert np.mean(dice_on) > np.mean(dice_off)


def test_the_judge_is_named_in_the_run_record_and_the_sets_provenance(pair, root):
    without, with_loss = pair
    entry = json.loads((with_loss / "synthesizer.json").read_text())["consistency"]
    checkpoint = _judge_folder(root) / "fold_0" / "checkpoint_final.pth"
    assert entry["judge"] == str(_judge_folder(root)) and entry["checkpoint"] == "fold_0/checkpoint_final.pth"
    assert entry["judge_sha256"] == file_sha256(checkpoint)
    assert {entry[k] for k in ("weight", "max_timestep", "every")} == {WEIGHT, 1000.0, 1}
    assert read_state(with_loss / "diffusion.safetensors")["consistency"]["judge_sha256"] == entry["judge_sha256"]
    from nnunet_diffaug.synthesis.synthesize import synthesize
    out = synthesize(EXAMPLE_ID, CONFIG, 0, 1, steps=3, device="cpu", progress=False, output_id=981)
    assert read_provenance(out).generator["consistency"] == entry
    assert "consistency" not in provenance_entries(without)   # sets of synthesizers without it: as before


# ---------------------------------------------------------------------------------------------- refusals

def _edited_copy(judge: Path, where: Path, edit, name: str | None = None) -> Path:
    copy = where / (name or judge.name)
    shutil.copytree(judge, copy)
    edit(copy)
    return copy


def test_judges_that_do_not_fit_are_refused_before_anything_is_written(judged_example, planned_example, tmp_path):
    _, splits = planned_example
    fresh = private_copy_of_example(judged_example, tmp_path / "fresh")
    judge = _judge_folder(judged_example)

    def other_split(folder):  # validated on cases that are not fold 0's validation cases
        judge_validated_on_another_split(folder, splits)

    def synthetic_trained(folder):
        judge_trained_with_synthetic_cases(folder)

    def other_plans(folder):
        plans = folder / "plans.json"
        plans.write_text(json.dumps({**json.loads(plans.read_text()), "plans_name": "nnUNetPlans"}))

    def planned_again(folder):
        plans = json.loads((folder / "plans.json").read_text())
        plans["configurations"][CONFIG]["patch_size"] = [4, 16, 16]
        (folder / "plans.json").write_text(json.dumps(plans))

    judges = [(_edited_copy(judge, tmp_path / "a", other_split), CONFIG, "trained on another fold or split"),
              (_edited_copy(judge, tmp_path / "b", synthetic_trained), CONFIG, "trained with synthetic cases"),
              (_edited_copy(judge, tmp_path / "c", other_plans, f"{TRAINER}__nnUNetPlans__{CONFIG}"), CONFIG,
               "trained with plans 'nnUNetPlans', not 'nnUNetPlansDiffAugSmall'"),
              (_edited_copy(judge, tmp_path / "d", planned_again), CONFIG, "planned again since the judge"),
              (judge, "2d", "trained on configuration '3d_fullres', not '2d'"),
              (tmp_path / "nowhere" / judge.name, CONFIG, "does not exist")]
    with nnunet_folders(fresh):
        for folder, configuration, message in judges:
            config = _config(folder)
            with pytest.raises(DiffAugError, match=message):
                train_synthesizer(EXAMPLE_ID, configuration, 0, config, plans_identifier=PLANS, device="cpu",
                                  progress=False)
        assert not (fresh / "results" / EXAMPLE_NAME).exists()   # refused before anything was written
        with pytest.raises(DiffAugError, match="--unlabeled-only: the config's segmentation-consistency loss"):
            train_synthesizer(EXAMPLE_ID, CONFIG, 0, _config(judge), plans_identifier=PLANS, device="cpu",
                              progress=False, unlabeled=[str(tmp_path)], unlabeled_only=True)


def test_a_resume_with_another_judge_is_refused_and_with_its_own_continues(pair, root, tmp_path):
    """ControlNet, EMA, the loss every 2nd step at t <= 300 (steps without it log None), killed and resumed."""
    without, _ = pair
    judge = _edited_copy(_judge_folder(root), tmp_path / "judges", lambda folder: None)
    config = _config(judge, autoencoder_steps=60, diffusion={"conditioning": "controlnet", "ema_decay": 0.9,
                                                             "steps": 10}, max_timestep=300, every=2)
    with nnunet_folders(private_copy_of_example(root, tmp_path / "run")):
        folder = synthesizer_folder(EXAMPLE_NAME, CONFIG, 0)
        _with_autoencoder(folder, without / "autoencoder.safetensors")
        _train(config, stop_after=5)
        assert (folder / "diffusion_checkpoint.safetensors").is_file()
        final = judge / "fold_0" / "checkpoint_final.pth"
        saved = final.read_bytes()
        shutil.copy(judge / "fold_0" / "checkpoint_best.pth", final)   # the same folder, another model
        with pytest.raises(DiffAugError, match="started with the consistency judge .* a run must keep the judge"):
            _train(config)
        other = _edited_copy(judge, tmp_path / "other", lambda folder: None)  # another folder, another model
        with pytest.raises(DiffAugError, match="started with the consistency judge"):
            _train(dataclasses_replace_judge(config, other))
        final.write_bytes(saved)
        _train(config)   # its own judge: continues from step 5
        log = (folder / "training_log.txt").read_text()
        assert "diffusion: resuming from step 5 of 10" in log
        losses = read_state(folder / "diffusion.safetensors")["losses"]["consistency"]
        assert len(losses) == 10 and all(v is None for v in losses[1::2])     # every 2nd step only
        measured = [v for v in losses if v is not None]
        assert measured and all(np.isfinite(measured))
        assert Synthesizer.load(folder, torch.device("cpu")).weights == "ema"


def dataclasses_replace_judge(config: SynthesizerConfig, judge: Path) -> SynthesizerConfig:
    obj = config.to_json()
    obj["consistency"]["judge"] = str(judge)
    return SynthesizerConfig.from_json(obj)


def test_two_processes_train_with_the_loss(pair, root, tmp_path):
    """torchrun, DDP over gloo: each process scores its own selected samples (at t <= 300 some have none)."""
    without, _ = pair
    run_root = private_copy_of_example(root, tmp_path / "ddp", with_results=True)
    shutil.rmtree(run_root / "results" / EXAMPLE_NAME / f"diffaug_synthesizer__{CONFIG}")  # the pair's
    config = _config(_judge_folder(run_root), diffusion={"steps": 4}, max_timestep=300)
    preset = tmp_path / "ddp.json"
    preset.write_text(json.dumps(config.to_json()))
    with nnunet_folders(run_root):
        folder = synthesizer_folder(EXAMPLE_NAME, CONFIG, 0)
    _with_autoencoder(folder, without / "autoencoder.safetensors")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           console_script("diffaug_train_synthesizer"), "-d", str(EXAMPLE_ID), "-f", "0", "-c", CONFIG, "-p", PLANS,
           "--preset", str(preset), "-device", "cpu", "--seed", "0"]
    proc = subprocess.run(cmd, env=nnunet_env(run_root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (folder / "training_log.txt").read_text()
    assert log.count("segmentation-consistency loss") == 1 and "2 processes" in log
    losses = read_state(folder / "diffusion.safetensors")["losses"]["consistency"]
    assert len(losses) == 4 and any(v is not None for v in losses)


# ---------------------------------------------------------------------------------------------- benchmark

def test_the_consistency_arm_trains_its_synthesizer_with_the_folds_stock_model_as_judge(tmp_path, monkeypatch):
    from nnunet_diffaug.benchmark import BenchmarkSettings, builtin_arm, run_benchmark
    from nnunet_diffaug.benchmark.arms import CONSISTENCY
    arm = builtin_arm("diffaug_r33_auto_consistency")
    assert arm.synthetic.consistency and dict(arm.env) == dict(builtin_arm("diffaug_r33_auto").env)
    assert arm.synthetic.key != builtin_arm("diffaug_r33_auto").synthetic.key
    assert builtin_arm("randomised_r33_consistency") is None and builtin_arm("diffaug_r33_consistency_context") is None
    assert builtin_arm("diffaug_r33_auto_context_consistency").synthetic.context
    dataset = toy_benchmark_dataset(tmp_path, monkeypatch)
    s = BenchmarkSettings(dataset=dataset, train_sizes=(2,), seeds=(0,), epochs=1, iterations=1,
                          test_cases=("toy_000", "toy_001", "toy_002"),
                          arms=("diffaug_r33_auto", "diffaug_r33_auto_consistency"))
    runner = RecordingRunner()
    run_benchmark(s, tmp_path / "ws", runner=runner)
    names = [(name, Path(env["nnUNet_results"]).name) for name, _, env in runner.calls]
    trained = {Path(env["nnUNet_results"]).name: cmd for name, cmd, env in runner.calls
               if name == "diffaug_train_synthesizer"}
    assert sorted(trained) == ["synthesizer", "synthesizer_consistency"]
    # the judge (the stock arm of the fold) is trained before the synthesizer that learns from it
    assert names.index(("nnUNetv2_train", "stock")) < names.index(("diffaug_train_synthesizer",
                                                                   "synthesizer_consistency"))
    preset = Path(trained["synthesizer_consistency"][trained["synthesizer_consistency"].index("--preset") + 1])
    assert preset.name == "synthesizer_consistency.json"
    written = SynthesizerConfig.from_json(json.loads(preset.read_text()))
    stock = tmp_path / "ws" / "results" / "stock" / dataset / f"nnUNetTrainerBudget__nnUNetPlans__{s.configuration}"
    assert Path(written.consistency.judge) == stock
    assert {k: getattr(written.consistency, k) for k in CONSISTENCY} == CONSISTENCY
    plain = {k: v for k, v in SynthesizerConfig.from_json({"base": "tiny"}).to_json().items() if k != "consistency"}
    assert {k: v for k, v in written.to_json().items() if k != "consistency"} == plain
    sets = {Path(env["nnUNet_results"]).name: env["DIFFAUG_SYNTHETIC_DATASET"]
            for name, _, env in runner.calls if name == "nnUNetv2_train" and "DIFFAUG_SYNTHETIC_DATASET" in env}
    assert sets["diffaug_r33_auto_consistency"] != sets["diffaug_r33_auto"]


# ---------------------------------------------------------------------------------------------- 2d

@pytest.fixture(scope="module")
def root_2d(planned_example, tmp_path_factory):
    """A private copy of the example with a tiny 2d nnU-Net trained on fold 0's real slabs: the judge of the
    2d path, where the painter and the judge both work on single slices."""
    root = private_copy_of_example(planned_example[0], tmp_path_factory.mktemp("consistency_2d"))
    train_tiny_judge(root, "2d")
    with nnunet_folders(root):
        yield root


def test_in_2d_the_loss_reads_slices_with_a_2d_judge_and_falls(root_2d):
    judge = root_2d / "results" / EXAMPLE_NAME / f"{TRAINER}__{PLANS}__2d"
    # a 3d judge for a 2d painter is refused: it reads volumes, the painter paints slices
    with pytest.raises(DiffAugError, match="trained on configuration '2d', not '3d_fullres'"):
        _train(_config(judge, diffusion={"steps": 2}))
    assert not synthesizer_folder(EXAMPLE_NAME, CONFIG, 0).exists()   # refused before anything was written
    without, folder = _train_pair("2d", judge)   # as the 3d pair
    consistency = read_state(folder / "diffusion.safetensors")["losses"]["consistency"]
    assert len(consistency) == DIFFUSION_STEPS and all(np.isfinite(v) for v in consistency)
    first, last = np.mean(consistency[:15]), np.mean(consistency[-15:])
    syn_off, loss = _loaded(without, folder)
    loss_off = _fixed_batch_losses(syn_off, loss, "2d")
    loss_on = _fixed_batch_losses(_loaded(folder, folder)[0], loss, "2d")
    print(f"2d consistency loss: first 15 steps {first:.3f}, last 15 {last:.3f}; fixed batches without "
          f"{np.round(loss_off, 3)}, with {np.round(loss_on, 3)}")
    assert last < first - 0.03
    # what the loss adds beyond denoising better: lower on batches it never trained on than without it
    assert np.mean(loss_on) < np.mean(loss_off) and sum(on < off for on, off in zip(loss_on, loss_off)) >= 6
    entry = json.loads((folder / "synthesizer.json").read_text())["consistency"]
    assert entry["judge"] == str(judge) and entry["judge_sha256"] == file_sha256(judge / "fold_0" /
                                                                                 "checkpoint_final.pth")
