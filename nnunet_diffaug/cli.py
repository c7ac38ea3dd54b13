"""Argument parsing for every console script. Thin: each entry parses, then calls the library.

Refusals (:class:`DiffAugError`) are printed as one clear line and exit with status 2, not a traceback.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

from nnunet_diffaug.errors import DiffAugError


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


def ensure_trainer_discoverable() -> str:
    """Points nnUNet_extTrainer at our shim folder for this process and every process it starts."""
    from nnunet_diffaug.paths import trainer_shim_folder
    shim = str(trainer_shim_folder())
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if shim not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [shim])
    return os.environ["nnUNet_extTrainer"]


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
    from nnunet_diffaug.paths import trainer_shim_folder
    shim = str(trainer_shim_folder())
    current = [q for q in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if q and q != shim]
    value = os.pathsep.join(current + [shim])
    print(f"export nnUNet_extTrainer='{value}'")


@_friendly_errors
def make_example_entry(argv=None):
    p = argparse.ArgumentParser(
        prog="diffaug_make_example", formatter_class=_formatter,
        description="Write the built-in example dataset (real chest CT from the slicerio package, cut into "
                    "disjoint axial slabs) into $nnUNet_raw.")
    p.add_argument("-d", type=int, default=990, help="dataset id to write")
    p.add_argument("--slab-slices", type=int, default=4, help="axial slices per case")
    p.add_argument("--in-plane-size", type=int, default=64, help="in-plane voxels per side (the CT has 128)")
    p.add_argument("--overwrite", action="store_true", help="rewrite the dataset if it exists")
    args = p.parse_args(argv)
    from nnunet_diffaug.example_data import build_example_dataset
    from nnunet_diffaug.paths import nnunet_raw
    folder = build_example_dataset(nnunet_raw(), args.d, slab_slices=args.slab_slices,
                                   in_plane_size=args.in_plane_size, overwrite=args.overwrite)
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
    p.add_argument("--features", type=int, nargs="+", default=[4, 8, 16, 32],
                   help="feature maps per resolution stage (also sets the number of stages)")
    p.add_argument("--patch-size", type=int, nargs="+", default=None,
                   help="patch size per configuration axis; default: the source patch capped at 32 per axis")
    p.add_argument("--batch-size", type=int, default=2, help="batch size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plans file of that name")
    args = p.parse_args(argv)
    from nnunet_diffaug.small_plans import write_small_plans
    from nnunet_diffaug.paths import resolve_dataset_name
    out = write_small_plans(resolve_dataset_name(args.d), args.p, args.o, features=args.features,
                            patch_size=args.patch_size, batch_size=args.batch_size, overwrite=args.overwrite)
    print(out)


# ----------------------------------------------------------------------------------------------
# generative side (parsers owned by the synthesis package's authors; keep them thin)
# ----------------------------------------------------------------------------------------------

@_friendly_errors
def train_synthesizer_entry(argv=None):
    raise DiffAugError("diffaug_train_synthesizer is not available yet in this build.")


@_friendly_errors
def synthesize_entry(argv=None):
    raise DiffAugError("diffaug_synthesize is not available yet in this build.")
