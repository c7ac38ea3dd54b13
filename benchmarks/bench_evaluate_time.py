"""Time per case of diffaug_evaluate's slow step (the judge segmenting a case) with nnU-Net's DEFAULT plans.

Builds a real-sized dataset from the chest CT shipped by slicerio (the whole CT resampled to 3 mm isotropic:
about 113 x 130 x 130 voxels, the size of a typical abdominal or chest CT at 3 mm), plans it with nnU-Net's
default planner, trains a judge for a token budget (prediction time does not depend on how well it is
trained), then times ``TrainedModel.segment`` (nnU-Net's sliding-window predictor + export) per case with and
without test-time mirroring. Everything lives in a scratch folder (-o); nothing of the user's is touched.

    python benchmarks/bench_evaluate_time.py -o /tmp/bench_eval -device cpu

Writes ``evaluate_time.json`` into the scratch folder and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from nnunet_diffaug.paths import console_script

DATASET_ID, NAME = 981, "Dataset981_ChestCT3mm"


def build_dataset(raw: Path, n_cases: int) -> None:
    """n_cases variants of the whole chest CT at 3 mm isotropic (flips and noise: only the size matters here)."""
    import SimpleITK as sitk
    from nnunet_diffaug.example_data import EXAMPLE_LABELS, load_chest_ct
    from nnunet_diffaug.file_io import atomic_write_image, atomic_write_json
    folder = raw / NAME
    if (folder / "dataset.json").is_file():
        return
    ct, label = load_chest_ct()
    spacing = (3.0, 3.0, 3.0)
    size = [int(round(sz * sp / 3.0)) for sz, sp in zip(ct.GetSize(), ct.GetSpacing())]
    def resample(img, interp, pixel, default):
        return sitk.Resample(img, size, sitk.Transform(), interp, img.GetOrigin(), spacing, img.GetDirection(),
                             default, pixel)
    ct = resample(ct, sitk.sitkLinear, sitk.sitkFloat32, -1024.0)
    label = resample(label, sitk.sitkNearestNeighbor, sitk.sitkUInt8, 0)
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        arr, lab = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(label)
        if i % 2:
            arr, lab = arr[:, :, ::-1], lab[:, :, ::-1]
        img = sitk.GetImageFromArray(np.round(arr + rng.normal(0, 10, arr.shape)).astype(np.int16))
        seg = sitk.GetImageFromArray(np.ascontiguousarray(lab))
        img.CopyInformation(ct)
        seg.CopyInformation(ct)
        atomic_write_image(img, folder / "imagesTr" / f"ct_{i:03d}_0000.nii.gz")
        atomic_write_image(seg, folder / "labelsTr" / f"ct_{i:03d}.nii.gz")
    atomic_write_json(folder / "dataset.json", {"channel_names": {"0": "CT"}, "labels": EXAMPLE_LABELS,
                                                "numTraining": n_cases, "file_ending": ".nii.gz", "name": NAME})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", required=True, help="scratch folder")
    p.add_argument("-device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cases", type=int, default=2, help="cases timed per setting")
    args = p.parse_args(argv)
    root = Path(args.o).resolve()
    env = dict(os.environ)
    for k in ("raw", "preprocessed", "results"):
        (root / k).mkdir(parents=True, exist_ok=True)
    env.update({"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
                "nnUNet_results": str(root / "results")})
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    from nnunet_diffaug.trainer_discovery import ensure_trainer_discoverable
    env["nnUNet_extTrainer"] = ensure_trainer_discoverable()

    build_dataset(root / "raw", 5)
    if not (root / "preprocessed" / NAME / "nnUNetPlans.json").is_file():
        subprocess.run([console_script("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres",
                        "-np", "1", "-npfp", "1"], env=env, check=True)
    trainer = "nnUNetTrainerBudget"
    model = root / "results" / NAME / f"{trainer}__nnUNetPlans__3d_fullres"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        budget = {"DIFFAUG_NUM_EPOCHS": "1", "DIFFAUG_ITERATIONS_PER_EPOCH": "2", "DIFFAUG_VAL_ITERATIONS": "1",
                  "DIFFAUG_SEED": "0"}
        subprocess.run([console_script("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", trainer,
                        "-device", args.device], env={**env, **budget}, check=True)

    from nnunet_diffaug.evaluation.nnunet_model import TrainedModel
    from nnunet_diffaug.raw_dataset import list_cases
    import torch
    cases = list(list_cases(root / "raw" / NAME).items())[:args.cases]
    rows = []
    for mirroring in (False, True):
        judge = TrainedModel(model, 0, device=args.device, use_mirroring=mirroring)
        seconds = []
        for cid, case in cases:
            pre = judge.preprocess(cid, case)
            t0 = time.perf_counter()
            judge.segment(pre, root / "timing" / f"{cid}_mirror{int(mirroring)}")
            seconds.append(time.perf_counter() - t0)
        rows.append({"test_time_mirroring": mirroring, "seconds_per_case": seconds,
                     "mean_seconds_per_case": float(np.mean(seconds)), "patch_size": list(judge.patch_size),
                     "preprocessed_shape": list(pre.data.shape[1:]), "device": args.device,
                     "torch_threads": torch.get_num_threads()})
    (root / "evaluate_time.json").write_text(json.dumps(rows, indent=2))
    print("| test-time mirroring | s per case | preprocessed case | judge patch | device |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['test_time_mirroring'] else 'off (--disable_tta)'} | {r['mean_seconds_per_case']:.1f} | "
              f"{' x '.join(map(str, r['preprocessed_shape']))} | {' x '.join(map(str, r['patch_size']))} | "
              f"{r['device']} |")


if __name__ == "__main__":
    main()
