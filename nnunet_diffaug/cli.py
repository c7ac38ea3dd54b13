"""Argument parsing for every console script. Thin: each entry parses, then calls the library.

Refusals (:class:`DiffAugError`) are printed as one clear line and exit with status 2, not a traceback.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.trainer_discovery import ensure_trainer_discoverable


def _friendly_errors(main):
    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except DiffAugError as e:
            print(f"ERROR: {e}", file=sys.stderr)
            sys.exit(2)
    return wrapper


def _formatter(prog):
    return argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=40)


# Numeric flags are checked while parsing, so an out-of-range value is refused (argparse names the flag,
# exit status 2) before any work starts, instead of falling back to some default deep inside a run.
def _int_at_least(low: int):
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    convert.__name__ = f"integer >= {low}"
    return convert


def _float_in(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"
            raise argparse.ArgumentTypeError(f"must lie in {interval}, got {text}")
        return value
    convert.__name__ = "number"
    return convert


POSITIVE_INT, NON_NEGATIVE_INT = _int_at_least(1), _int_at_least(0)


# Renamed options keep their old spelling, hidden from -h, with a note on stderr (one spelling per option across
# commands: docs and -h show only the new one).
def _deprecated(old: str, instead: str) -> None:
    print(f"NOTE: {old} is deprecated: {instead}.", file=sys.stderr)


def _renamed_option(new_value, old_value, old: str, new: str):
    if old_value is None:
        return new_value
    if new_value is not None and new_value != old_value:
        raise DiffAugError(f"{old} {old_value} and {new} {new_value} disagree; give it once, as {new}.")
    _deprecated(old, f"use {new}")
    return old_value


# ----------------------------------------------------------------------------------------------
# nnU-Net side
# ----------------------------------------------------------------------------------------------

@_friendly_errors
def trainer_path_entry(argv=None):
    p = argparse.ArgumentParser(
        prog="diffaug_trainer_path", formatter_class=_formatter,
        description="Print the shell line that lets nnUNetv2_train/nnUNetv2_predict find nnUNetTrainerDiffAug. "
                    "Use it as: eval \"$(diffaug_trainer_path)\"")
    p.parse_args(argv)
    print(f"export nnUNet_extTrainer='{ensure_trainer_discoverable()}'")


@_friendly_errors
def make_example_entry(argv=None):
    from nnunet_diffaug.example_data import FOREGROUND_NAMES, build_example_dataset, select_labels
    p = argparse.ArgumentParser(
        prog="diffaug_make_example", formatter_class=_formatter,
        description="Write the built-in example dataset (real chest CT from the slicerio package, cut into "
                    "disjoint axial slabs) into $nnUNet_raw.")
    p.add_argument("-d", type=int, default=990, help="dataset id to write")
    p.add_argument("--slab-slices", type=POSITIVE_INT, default=4,
                   help="axial slices per case (3d_fullres needs at least 4: stock nnU-Net's blur augmentation "
                        "pads each axis by up to 3)")
    p.add_argument("--in-plane-size", type=POSITIVE_INT, default=64, help="in-plane voxels per side (the CT has 128)")
    p.add_argument("--overwrite", action="store_true", help="rewrite the dataset if it exists")
    p.add_argument("--labels", nargs="+", metavar="NAME", default=None,
                   help="keep only these classes labelled (sparse labels, as most real datasets have), renumbered "
                        "1..k in this order; every other voxel is background, the images are unchanged, and the "
                        "dataset is named after them (--labels spine ribs: DatasetNNN_ChestCTSlabsSpineRibs). "
                        f"Names: {', '.join(FOREGROUND_NAMES)}. None: keep all")
    args = p.parse_args(argv)
    from nnunet_diffaug.paths import nnunet_raw
    select_labels(args.labels)  # an unknown name is refused before $nnUNet_raw is looked at
    folder = build_example_dataset(nnunet_raw(), args.d, slab_slices=args.slab_slices,
                                   in_plane_size=args.in_plane_size, overwrite=args.overwrite, labels=args.labels)
    print(folder)


@_friendly_errors
def small_plans_entry(argv=None):
    p = argparse.ArgumentParser(
        prog="diffaug_small_plans", formatter_class=_formatter,
        description="Write a small copy of a dataset's plans (narrow network, small patch) beside the original, "
                    "for CPU runs, tests and quick benchmarks. Train with nnUNetv2_train ... -p <new identifier>. "
                    "The preprocessed data are shared with the source plans; the original plans are not changed.")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-p", default="nnUNetPlans", help="source plans identifier")
    p.add_argument("-o", default="nnUNetPlansDiffAugSmall", help="identifier of the plans to write")
    p.add_argument("--features", type=POSITIVE_INT, nargs="+", default=[4, 8, 16, 32],
                   help="feature maps per resolution stage (also sets the number of stages)")
    p.add_argument("--patch-size", type=POSITIVE_INT, nargs="+", default=None,
                   help="patch size (3 values for 3D configurations, 2 for 2d); default: the source patch capped "
                        "at --max-patch per axis")
    p.add_argument("--max-patch", type=POSITIVE_INT, default=32, help="cap per axis for configurations without --patch-size")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=2, help="batch size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plans file of that name")
    args = p.parse_args(argv)
    from nnunet_diffaug.small_plans import write_small_plans
    from nnunet_diffaug.paths import resolve_dataset_name
    out = write_small_plans(resolve_dataset_name(args.d), args.p, args.o, features=args.features,
                            patch_size=args.patch_size, max_patch=args.max_patch, batch_size=args.batch_size,
                            overwrite=args.overwrite)
    print(out)


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _size(value: str):
    if value == "all":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"training-set size must be an integer or 'all', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"training-set size must be >= 1, got {n}")
    return n


@_friendly_errors
def benchmark_entry(argv=None):
    p = argparse.ArgumentParser(
        prog="diffaug_benchmark", formatter_class=_formatter,
        description="Stock nnU-Net vs any set of named arms (DiffAug ratios, schedules, equal real exposure, "
                    "PatchMix, synthetic-only, deformed-real and randomised controls) on held-out real cases at "
                    "several training-set sizes and seeds (same subsets, seeds and budget for every arm). Writes "
                    "benchmark_table.md, benchmark_results.json and benchmark_plot.png into the output folder; "
                    "resumable, and adding arms or seeds to a workspace trains only what is new.")
    p.add_argument("-d", required=True, help="dataset name or id (planned and preprocessed)")
    p.add_argument("-c", default="3d_fullres", choices=["2d", "3d_fullres"], help="nnU-Net configuration")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-o", default=None, help="workspace/output folder (default: $nnUNet_results/<dataset>/diffaug_benchmark__<c>)")
    p.add_argument("--train-sizes", nargs="+", type=_size, default=[2, 5, "all"], help="real training cases per arm")
    p.add_argument("--seeds", nargs="+", type=NON_NEGATIVE_INT, default=[0, 1, 2], help="seeds (one subset per size and seed)")
    p.add_argument("--test-fraction", type=_float_in(0, 1, True, True), default=0.3, help="share of real cases held out for testing")
    p.add_argument("--test-cases", nargs="+", default=[], help="held-out test cases (overrides --test-fraction)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=50, help="nnU-Net epochs per arm")
    p.add_argument("--iterations", type=POSITIVE_INT, default=50, help="training iterations per epoch")
    p.add_argument("--arms", nargs="+", default=None, metavar="NAME",
                   help="arms to run besides stock (always run): e.g. diffaug_r33 (constant share) "
                        "diffaug_r33_auto (the trainer's default schedule) diffaug_r33_linear "
                        "diffaug_r33_cutoff50 diffaug_r33_equalreal diffaug_r33_auto_unlabeled patchmix synthetic_only "
                        "deformed_real_r33 randomised_r33 (grammar in docs/benchmarking.md); default: diffaug_r33_auto")
    p.add_argument("--arms-file", default=None,
                   help="JSON file of custom arms: name -> {trainer, env, synthetic: {generator, labels} or null}")
    # older spellings of --arms diffaug_r<NN> / --arms synthetic_only, hidden from -h
    p.add_argument("--ratios", nargs="+", type=_float_in(0, 1, low_open=True), default=[], help=argparse.SUPPRESS)
    p.add_argument("--synthetic-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n-synthetic", type=POSITIVE_INT, default=20, help="synthetic cases per subset")
    p.add_argument("--synthesizer-preset", default="tiny", help="synthesizer preset or config JSON")
    p.add_argument("--sampler", default="dpmpp", help="diffusion sampler for synthesis")
    p.add_argument("--steps", type=POSITIVE_INT, default=20, help="sampler steps")
    p.add_argument("--small-plans", action="store_true", help="use a small network/patch copy of the plans (CPU)")
    p.add_argument("--no-mirroring", action="store_true",
                   help="every arm trains and predicts without nnU-Net's mirroring (as nnUNetTrainerNoMirroring): "
                        "for labels that name a side (left/right lung, kidney), which mirroring makes a coin flip")
    p.add_argument("-device", default=None, choices=["cpu", "cuda"], help="device (default: cuda if available)")
    p.add_argument("--verbose", action="store_true", help="show the output of every step")
    args = p.parse_args(argv)
    ensure_trainer_discoverable()
    from nnunet_diffaug.benchmark import DEFAULT_ARMS, BenchmarkSettings, format_table, run_benchmark, settings_arms
    from nnunet_diffaug.paths import nnunet_results, resolve_dataset_name
    arms = _arms_with_older_flags(args, DEFAULT_ARMS)
    arms_file = str(os.path.abspath(args.arms_file)) if args.arms_file else None
    # arm names and the arms file are checked before the dataset is even looked up
    settings_arms(BenchmarkSettings(dataset="", arms=tuple(arms), arms_file=arms_file))
    dataset = resolve_dataset_name(args.d)
    settings = BenchmarkSettings(
        dataset=dataset, configuration=args.c, plans=args.p, train_sizes=tuple(args.train_sizes),
        seeds=tuple(args.seeds), test_fraction=args.test_fraction, test_cases=tuple(args.test_cases),
        epochs=args.epochs, iterations=args.iterations, arms=tuple(arms), arms_file=arms_file,
        n_synthetic=args.n_synthetic, synthesizer_preset=args.synthesizer_preset, sampler=args.sampler,
        steps=args.steps, device=args.device or _default_device(), small_plans=args.small_plans,
        mirroring=not args.no_mirroring)
    out = args.o or nnunet_results() / dataset / f"diffaug_benchmark__{args.c}"
    results = run_benchmark(settings, out, verbose=args.verbose)
    print(format_table(results))
    print(f"Written to {out}")


def _arms_with_older_flags(args, default_arms) -> list[str]:
    """--ratios R [R ...] and --synthetic-only are older spellings of arm names: say which --arms they mean."""
    if not args.ratios and not args.synthetic_only:
        return list(args.arms) if args.arms is not None else list(default_arms)
    from nnunet_diffaug.benchmark.arms import ratio_arm_name
    arms = list(args.arms) if args.arms is not None else ["stock"]
    arms += [ratio_arm_name(r) for r in args.ratios] + (["synthetic_only"] if args.synthetic_only else [])
    old = " ".join([f"--ratios {' '.join(f'{r:g}' for r in args.ratios)}"] * bool(args.ratios) +
                   ["--synthetic-only"] * args.synthetic_only)
    _deprecated(old, f"it means --arms {' '.join(arms)}")
    return arms


@_friendly_errors
def demo_entry(argv=None):
    p = argparse.ArgumentParser(
        prog="diffaug_demo", formatter_class=_formatter,
        description="End-to-end demo on the built-in example data (a real chest CT shipped by slicerio): builds an "
                    "nnU-Net dataset, plans it, trains a synthesizer, synthesizes, trains stock nnU-Net and "
                    "nnUNetTrainerDiffAug with the same seed and iterations, and prints their Dice on held-out real "
                    "cases. Uses its own nnU-Net folders inside the output folder.")
    from nnunet_diffaug.demo import DEMO_CONFIGURATION, DEMO_EPOCHS, DEMO_ITERATIONS
    p.add_argument("-o", default="diffaug_demo_output", help="output folder")
    p.add_argument("-c", default=DEMO_CONFIGURATION, choices=["2d", "3d_fullres"], help="nnU-Net configuration")
    p.add_argument("-device", default=None, choices=["cpu", "cuda"], help="device (default: cuda if available)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=DEMO_EPOCHS, help="nnU-Net epochs per arm")
    p.add_argument("--iterations", type=POSITIVE_INT, default=DEMO_ITERATIONS, help="training iterations per epoch")
    p.add_argument("--n-synthetic", type=POSITIVE_INT, default=16, help="synthetic cases to generate")
    p.add_argument("--synthesizer-preset", default="tiny", help="synthesizer preset or config JSON file")
    p.add_argument("--verbose", action="store_true", help="show the output of every step")
    args = p.parse_args(argv)
    ensure_trainer_discoverable()
    from nnunet_diffaug.demo import run_demo
    run_demo(args.o, device=args.device or _default_device(), epochs=args.epochs, iterations=args.iterations,
             n_synthetic=args.n_synthetic, verbose=args.verbose, synthesizer_preset=args.synthesizer_preset,
             configuration=args.c)


@_friendly_errors
def evaluate_entry(argv=None):
    p = argparse.ArgumentParser(
        prog="diffaug_evaluate", formatter_class=_formatter,
        description="Quality of a synthetic raw dataset, with no downloaded weights: a trained nnU-Net model of the "
                    "real dataset segments the synthetic images (label fidelity) and gives encoder features "
                    "(Fréchet distance); plus diversity (MS-SSIM), label statistics and memorisation (near-copies "
                    "of training cases). The fold's validation cases are the held-out real reference. Writes "
                    "evaluation.json, evaluation.md and evaluation_montage.png.")
    p.add_argument("-d", required=True, help="real dataset name or id")
    p.add_argument("-f", type=NON_NEGATIVE_INT, required=True, help="fold (splits_final.json): its training cases are what the "
                                                        "synthesizer and the model saw, its validation cases are held out")
    p.add_argument("--synthetic", default=None,
                   help="synthetic dataset (DatasetYYY_Name, id or folder); default: the one whose provenance names "
                        "this dataset and fold")
    p.add_argument("--model", default=None,
                   help="folder of a trained nnU-Net model (e.g. $nnUNet_results/DatasetXXX/"
                        "nnUNetTrainer__nnUNetPlans__3d_fullres); default: built from -tr, -p and -c")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer of the model (when --model is not given)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier of the model (when --model is not given)")
    p.add_argument("-c", default="3d_fullres", help="configuration of the model (when --model is not given)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file of the fold")
    p.add_argument("-o", default=None,
                   help="output folder; default: <synthetic>/diffaug_evaluation/<model folder name>/fold_<f>")
    p.add_argument("-device", default=None, choices=["cpu", "cuda"], help="device (default: cuda if available)")
    p.add_argument("--max-cases", type=_int_at_least(2), default=None,
                   help="use at most this many cases of each set (synthetic, training, validation), evenly spread")
    p.add_argument("--disable_tta", action="store_true",
                   help="no test-time mirroring. Mirroring averages the judge's prediction over every flip of "
                        "its mirror axes (8 in 3D, 4 in 2d), so segmenting a case costs up to 8x more; disabling "
                        "it makes label fidelity a little lower for synthetic and real cases alike (the "
                        "validation cases are then predicted again without it, so both Dice values are made the "
                        "same way). Segmentations are kept and reused by a rerun.")
    p.add_argument("--max-tiles", type=POSITIVE_INT, default=16, help="encoder-feature tiles per case for the Fréchet distance")
    p.add_argument("--memorisation-percentile", type=_float_in(0, 100, True), default=5.0,
                   help="a synthetic case counts as close to a training case when its distance is below this "
                        "percentile of real-to-real nearest distances; close in image AND texture distance = "
                        "flagged as a near-copy, close in image distance only = reused anatomy")
    p.add_argument("--memorisation-threshold", type=_float_in(0), default=0.01,
                   help="a distance (1 - NCC) below this also counts as close, whatever the percentile says")
    args = p.parse_args(argv)
    if args.max_cases is not None and args.max_cases < 2:
        raise DiffAugError(f"--max-cases {args.max_cases}: at least 2 cases per set are needed for pairwise metrics.")
    ensure_trainer_discoverable()  # the model's trainer class may be one of ours
    from nnunet_diffaug.evaluation import Settings, evaluate, resolve_inputs
    inputs = resolve_inputs(args.d, args.f, synthetic=args.synthetic, model_folder=args.model, trainer=args.tr,
                            plans=args.p, configuration=args.c, checkpoint=args.chk, max_cases=args.max_cases)
    settings = Settings(device=args.device or _default_device(), use_mirroring=not args.disable_tta,
                        max_tiles_per_case=args.max_tiles, memorisation_percentile=args.memorisation_percentile,
                        memorisation_absolute=args.memorisation_threshold)
    result = evaluate(inputs, args.o, settings)
    from nnunet_diffaug.evaluation.report import render_markdown, json_safe
    print(render_markdown(json_safe(result)).split("## Label fidelity per class")[0].rstrip())
    print(f"\nWritten to {result['output_folder']}")


# ----------------------------------------------------------------------------------------------
# generative side (parsers owned by the synthesis package's authors; keep them thin)
# ----------------------------------------------------------------------------------------------

def _add_common_synthesizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", required=True, help="dataset name or id (as for nnUNetv2_train)")
    p.add_argument("-f", type=NON_NEGATIVE_INT, required=True,
                   help="fold: the synthesizer sees only this fold's training cases (from splits_final.json)")
    p.add_argument("-c", default="3d_fullres", help="nnU-Net configuration whose preprocessed data are used "
                                                     "(3d_fullres, 2d, 3d_lowres)")
    p.add_argument("-device", default="auto", choices=["auto", "cuda", "cpu", "mps"],
                   help="torch device; auto = cuda when available, else cpu")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0,
                   help="random seed; the same seed gives the same result on the same device")
    p.add_argument("--verbose", action="store_true", help="print progress messages besides the progress bar")


@_friendly_errors
def train_synthesizer_entry(argv=None):
    p = argparse.ArgumentParser(
        prog="diffaug_train_synthesizer", formatter_class=_formatter,
        description="Train the label-conditioned image synthesizer of one fold on nnU-Net's preprocessed data: "
                    "an autoencoder, then a latent diffusion model conditioned on the label map (SPADE or "
                    "ControlNet). Checkpoints go to $nnUNet_results/<dataset>/diffaug_synthesizer__<config>/"
                    "fold_<f>/. An interrupted run continues when the same command is run again.")
    _add_common_synthesizer_args(p)
    p.add_argument("--preset", default=None,
                   help="model/training preset: 'tiny' (CPU, minutes), 'default' (GPU), or a JSON config file "
                        "(any subset of fields; missing ones come from its 'base' preset); default: default")
    p.add_argument("-p", default=None,
                   help="nnU-Net plans identifier of the preprocessed data, as in nnUNetv2_train -p; default: "
                        "nnUNetPlans")
    p.add_argument("-plans", default=None, help=argparse.SUPPRESS)  # older spelling of -p
    p.add_argument("--overwrite", action="store_true",
                   help="discard this fold's existing synthesizer (other config or seed) and start over")
    p.add_argument("--nproc", type=POSITIVE_INT, default=1,
                   help="train with this many processes on this machine (DistributedDataParallel; with -device cuda "
                        "one per GPU; batch sizes are per process): reruns this command under torchrun")
    p.add_argument("--unlabeled", nargs="+", default=None, metavar="SOURCE",
                   help="unlabelled images the synthesizer also learns from: folders of images named as imagesTs "
                        "(CASE_0000<file_ending>, the dataset's channels) or other nnU-Net raw datasets (their "
                        "images; labels ignored). Preprocessed with the dataset's plans (cached), checked against "
                        "the fold's validation cases by content hash; the autoencoder learns from them, the "
                        "diffusion model with a 'no label' condition (diffusion.unlabeled_share of each batch). "
                        "See docs/unlabelled_images.md")
    p.add_argument("--init-from", default=None, metavar="FOLDER",
                   help="a trained synthesizer's folder (another dataset, or this fold, same channels): every stage "
                        "starts from its weights and fine-tunes; tensors that read the label map are "
                        "re-initialised when the label sets differ (the training log lists what was loaded)")
    p.add_argument("--unlabeled-only", action="store_true",
                   help="learn from the --unlabeled images alone, no labelled case (-f is then not needed; every "
                        "labelled case of the dataset is refused among the images): a synthesizer blind to every "
                        "fold, written to diffaug_synthesizer__<c>/unlabeled_only, to start each fold's from with "
                        "--init-from")
    next(a for a in p._actions if a.dest == "f").required = False  # -f: required unless --unlabeled-only
    args = p.parse_args(argv)
    if args.f is None and not args.unlabeled_only:
        p.error("the following arguments are required: -f")
    if args.f is not None and args.unlabeled_only:
        p.error("-f: an --unlabeled-only synthesizer belongs to no fold (it is refused every labelled case); drop -f")
    preset, plans = _preset_and_plans(args)
    from nnunet_diffaug.synthesis import distributed
    if args.nproc > 1 and not distributed.launched_by_torchrun():
        from nnunet_diffaug.paths import console_script
        distributed.relaunch_under_torchrun(args.nproc, console_script("diffaug_train_synthesizer"),
                                            list(sys.argv[1:] if argv is None else argv))
        return
    from nnunet_diffaug.synthesis.config import load_config
    from nnunet_diffaug.synthesis.training import train_synthesizer
    folder = train_synthesizer(args.d, args.c, args.f, load_config(preset), plans_identifier=plans,
                               device=args.device, seed=args.seed, overwrite=args.overwrite, verbose=args.verbose,
                               unlabeled=[os.path.abspath(s) if os.path.exists(s) else s for s in args.unlabeled or []],
                               init_from=os.path.abspath(args.init_from) if args.init_from else None,
                               unlabeled_only=args.unlabeled_only)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per process
        print(folder)


def _preset_and_plans(args) -> tuple[str, str]:
    """``-p`` is the plans identifier, as in every nnU-Net command. Earlier versions used ``-p`` for the preset
    (``-p tiny``, ``-p my.json``) and ``-plans`` for the plans: those spellings still work, with a note."""
    from nnunet_diffaug.synthesis.config import PRESETS
    preset, plans = args.preset, args.p
    if plans is not None and (plans in PRESETS or plans.endswith(".json")):
        if preset is not None:
            raise DiffAugError(f"-p {plans} looks like a synthesizer preset, and --preset {preset} is given too: "
                               f"-p is the nnU-Net plans identifier.")
        print(f"NOTE: '-p {plans}' as the synthesizer preset is deprecated (-p is the plans identifier, as in "
              f"nnU-Net); use '--preset {plans}'.", file=sys.stderr)
        preset, plans = plans, None
    if args.plans is not None:
        if plans is not None and plans != args.plans:
            raise DiffAugError(f"-p {plans} and -plans {args.plans} disagree; give the plans identifier once, as -p.")
        plans = args.plans
    return preset or "default", plans or "nnUNetPlans"


@_friendly_errors
def synthesize_entry(argv=None):
    from nnunet_diffaug.synthesis.config import SAMPLERS
    p = argparse.ArgumentParser(
        prog="diffaug_synthesize", formatter_class=_formatter,
        description="Write a synthetic nnU-Net raw dataset ($nnUNet_raw/DatasetYYY_<Task>SynthF<f>) with the "
                    "fold's trained synthesizer (or a --generator that needs none): by default each case reuses a training label map of the fold, "
                    "randomly deformed, with a newly painted image in raw units (see --labels for new or aligned "
                    "maps). Rerunning continues; complete cases are kept.")
    _add_common_synthesizer_args(p)
    p.add_argument("-n", type=POSITIVE_INT, required=True, help="number of synthetic cases (over all parts)")
    p.add_argument("--generator", default="diffusion", choices=["diffusion", "randomised", "deformed-real"],
                   help="what paints the images: 'diffusion' = the fold's trained synthesizer; 'randomised' = "
                        "SynthSeg-style random intensities per class, bias field, blur, noise, gamma (no training); "
                        "'deformed-real' = the source case's real image deformed with its labels (a control)")
    p.add_argument("--randomisation", default=None, metavar="RANGES.json",
                   help="--generator randomised: JSON object overriding the default ranges (see docs/synthesis.md)")
    p.add_argument("--class-prior", default=None, choices=["uniform", "real"],
                   help="--generator randomised: 'uniform' (default) draws each class's intensity from wide ranges, "
                        "any contrast (SynthSeg); 'real' draws it around the class mean and sd of the label map's "
                        "source case, so the dataset's contrast between structures stays (bone stays brighter than "
                        "soft tissue); wins over the ranges file's class_prior")
    p.add_argument("-p", dest="plans", default=None,
                   help="nnU-Net plans identifier for randomised/deformed-real (default nnUNetPlans); diffusion "
                        "uses its synthesizer's")
    p.add_argument("-plans", dest="plans_old", default=None, help=argparse.SUPPRESS)  # older spelling of -p
    p.add_argument("--labels", default="real", choices=["real", "generated", "real-aligned", "inpaint"],
                   help="where label maps come from: 'real' = deformed training label maps of the fold; "
                        "'generated' = new maps from the fold's label generator; 'real-aligned' = case i paints "
                        "training case i mod n unchanged, as a full volume on its grid (for PatchMix); 'inpaint' "
                        "= training case i mod n kept, one structure edited (--edit) and only the region around it "
                        "repainted (--generator diffusion)")
    p.add_argument("--guidance", type=_float_in(0), default=None,
                   help="--labels generated: classifier-free guidance weight w (1 = plain conditional, > 1 "
                        "follows --volume more strongly; default: the synthesizer config's)")
    p.add_argument("--volume", nargs="+", default=None, metavar="CLASS=LOW:HIGH",
                   help="--labels generated: ask for the fraction of the map that CLASS (label name or value) "
                        "fills, drawn uniformly in [LOW, HIGH] (fractions in [0, 1]); unnamed classes follow the "
                        "training distribution")
    p.add_argument("--min-component-voxels", type=NON_NEGATIVE_INT, default=5,
                   help="--labels generated: fragments of a class smaller than this take the label around them "
                        "(0 keeps all)")
    p.add_argument("--spacing", type=_float_in(0, low_open=True), nargs=3, default=None, metavar=("S0", "S1", "S2"),
                   help="synthesizers trained with tag conditioning: paint every case as if acquired at this "
                        "spacing (mm, the axis order of dataset_fingerprint.json); default: each case's source "
                        "case's spacing (generated maps: a random training case's)")
    p.add_argument("--intensity-jitter", type=_float_in(0), default=0.0, metavar="S",
                   help="synthesizers trained with class intensity: move each class's mean intensity by S x a "
                        "standard normal x the fold's between-case sd of that class (0 = the real case's)")
    p.add_argument("--class-intensity", nargs="+", default=None, metavar="CLASS=MEAN",
                   help="synthesizers trained with class intensity: paint CLASS (label name or value) at this mean, "
                        "in the units of the synthetic raw images (HU for CT; normalised values for z-scored "
                        "channels); MEAN may be M0,M1,.. one per channel")
    p.add_argument("--calibrate-intensity", action=argparse.BooleanOptionalAction, default=None,
                   help="--generator diffusion (on by default): after painting, move every foreground class's mean "
                        "intensity to a real case's (the label map's source case, else a random training case; its "
                        "spread toward that case's, the painted texture kept), so no structure looks like its "
                        "surroundings; --no-calibrate-intensity keeps the cases as painted (and continues sets made "
                        "before this was the default)")
    p.add_argument("--label-guidance", type=_float_in(1), default=None, metavar="W",
                   help="--generator diffusion, synthesizers trained with the 'no label' condition (--unlabeled or "
                        "diffusion.label_dropout): classifier-free guidance weight on the label map, 1 = plain "
                        "conditional sampling, > 1 pushes each image towards its label map at twice the model calls; below 1 "
                        "images would follow their labels less, so it is refused "
                        "(default: the synthesizer config's sampling.label_guidance, 1)")
    inpaint = p.add_argument_group(
        "inpainting (--labels inpaint)", "edit one structure of a real case and repaint only the region around it; "
                                         "outside it every voxel is the real case's")
    inpaint.add_argument("--classes", default=None, metavar="A,B",
                         help="target classes (label names or values, comma-separated); default: every foreground class")
    inpaint.add_argument("--edit", default=None, metavar="EDIT[,EDIT]",
                         help="keep (repaint in place), move (to another place in the host), scale (resize about its "
                              "centre), paste (a structure of another training case); a list draws one per case "
                              "(default keep)")
    inpaint.add_argument("--host", default=None, metavar="CLASS",
                         help="move/scale/paste: the class the structure must lie in; voxels landing outside it are "
                              "clipped away (default: any non-target class inside the nonzero mask)")
    inpaint.add_argument("--margin", type=POSITIVE_INT, default=None,
                         help="voxels around the old and new structure that are repainted (default 4)")
    inpaint.add_argument("--scale-range", default=None, metavar="LOW:HIGH",
                         help="--edit scale: the factor is drawn uniformly in [LOW, HIGH] (default 0.6:1.5)")
    inpaint.add_argument("--resample-jumps", type=NON_NEGATIVE_INT, default=None,
                         help="RePaint resampling: each sampler step is redone this many times (default 1; each "
                              "adds one model call per step)")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help="reverse-diffusion sampler (default: the synthesizer config's, dpmpp); ddpm runs all "
                        "training timesteps")
    p.add_argument("--steps", type=POSITIVE_INT, default=None, help="sampler steps (default: the synthesizer config's)")
    p.add_argument("-num_parts", type=POSITIVE_INT, default=1, help="split the cases into this many parts (parallel runs)")
    p.add_argument("-part_id", type=NON_NEGATIVE_INT, default=0, help="which part this run writes (0 .. num_parts-1)")
    p.add_argument("--output-dataset", type=int, default=None, metavar="ID",
                   help="id of the synthetic dataset to write; default: the dataset of an identical earlier "
                        "request, else the next free id from 900")
    p.add_argument("-o", type=int, default=None, dest="output_dataset_old", help=argparse.SUPPRESS)  # deprecated
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output dataset that holds other synthetic cases (different provenance)")
    judge = p.add_argument_group(
        "judge filtering", "draw --candidates cases, let an nnU-Net model trained on this fold's REAL cases segment "
                           "each, and keep the -n whose segmentation agrees best with their own labels (mean Dice "
                           "over the classes each holds). Every score is recorded; reruns continue.")
    judge.add_argument("--judge", default=None, metavar="MODEL",
                       help="the judge: an nnU-Net model folder, or its name in $nnUNet_results/<dataset>/ "
                            "(e.g. nnUNetTrainer__nnUNetPlans__3d_fullres); its fold -f must be finished")
    judge.add_argument("--candidates", type=POSITIVE_INT, default=None,
                       help="--judge: candidates drawn (default 2 x -n)")
    judge.add_argument("--min-class-dice", type=_float_in(0, 1), default=None,
                       help="--judge: also drop candidates with any class below this Dice")
    judge.add_argument("--disable_tta", action="store_true",
                       help="--judge: no test-time mirroring (as in nnUNetv2_predict; by default the judge averages "
                            "its prediction over every flip of its mirror axes, up to 8x the cost per candidate)")
    judge.add_argument("--judge-tta", action="store_true", help=argparse.SUPPRESS)  # deprecated: now the default
    args = p.parse_args(argv)
    args.output_dataset = _renamed_option(args.output_dataset, args.output_dataset_old, "-o", "--output-dataset")
    args.plans = _renamed_option(args.plans, args.plans_old, "-plans", "-p")
    if args.judge_tta:
        if args.disable_tta:
            raise DiffAugError("--judge-tta and --disable_tta contradict each other; test-time mirroring is on "
                               "unless --disable_tta is given.")
        _deprecated("--judge-tta", "test-time mirroring is the judge's default now, as in nnU-Net; drop the flag "
                                   "(--disable_tta turns it off)")
    common = dict(labels=args.labels, sampler=args.sampler, steps=args.steps, seed=args.seed, guidance=args.guidance,
                  volume=args.volume, min_component_voxels=args.min_component_voxels, spacing=args.spacing,
                  generator=args.generator, plans_identifier=args.plans, randomisation=args.randomisation,
                  class_prior=args.class_prior,
                  intensity_jitter=args.intensity_jitter, class_intensity=args.class_intensity, verbose=args.verbose,
                  classes=args.classes, host=args.host, edit=args.edit, margin=args.margin,
                  scale_range=args.scale_range, resample_jumps=args.resample_jumps,
                  calibrate_intensity=args.calibrate_intensity, label_guidance=args.label_guidance)
    if args.judge is None:
        if args.candidates is not None or args.min_class_dice is not None or args.disable_tta:
            raise DiffAugError("--candidates, --min-class-dice and --disable_tta need --judge MODEL.")
        from nnunet_diffaug.synthesis.synthesize import synthesize
        folder = synthesize(args.d, args.c, args.f, args.n, num_parts=args.num_parts, part_id=args.part_id,
                            output_id=args.output_dataset, overwrite=args.overwrite, device=args.device, **common)
    else:
        from nnunet_diffaug.judge_filter import Judge, resolve_judge, synthesize_filtered
        from nnunet_diffaug.paths import resolve_dataset_name
        folder = resolve_judge(resolve_dataset_name(args.d), args.judge)
        folder = synthesize_filtered(args.d, args.c, args.f, args.n, args.candidates or 2 * args.n,
                                     Judge(folder, use_mirroring=not args.disable_tta), args.min_class_dice,
                                     output_id=args.output_dataset, overwrite=args.overwrite, device=args.device,
                                     num_parts=args.num_parts, **common)
    print(folder)
