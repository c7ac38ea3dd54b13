"""Label statistics of a trained label generator against the fold's real training maps, and its volume response.

    python benchmarks/label_generator_stats.py -d 990 -c 2d -f 0 -n 64 --class soft_tissue --guidance 1 3

Prints (1) per foreground class: mean volume fraction and mean connected-component count of the
real training maps (cropped/padded to the generator's canvas), of unconditional samples, and of an
untrained generator's samples; (2) for ``--class``: the mean measured fraction when asking for the
10th vs the 90th percentile of its training fractions (other classes drawn from the training
distribution), at each guidance weight.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from nnunet_diffaug.paths import resolve_dataset_name, synthesizer_folder
from nnunet_diffaug.synthesis.data import FoldData
from nnunet_diffaug.synthesis.label_attributes import component_counts, volume_fractions
from nnunet_diffaug.synthesis.label_generator import LabelGenerator
from nnunet_diffaug.synthesis.label_training import TrainingLabelMaps
from nnunet_diffaug.synthesis.synthesizer import read_run_files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True)
    p.add_argument("-c", default="3d_fullres")
    p.add_argument("-f", type=int, default=0)
    p.add_argument("-n", type=int, default=64, help="samples per setting")
    p.add_argument("--class", dest="cls", required=True, help="label name whose volume is requested")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    name = resolve_dataset_name(args.d)
    folder = synthesizer_folder(name, args.c, args.f)
    cfg, spec, _ = read_run_files(folder)
    dev = torch.device("cpu")
    gen = LabelGenerator.load(folder, cfg.label_generator, spec.spatial_dims, spec.num_classes, dev)
    torch.manual_seed(args.seed)  # the untrained reference's weights, the same on every run
    untrained = LabelGenerator(cfg.label_generator, spec.spatial_dims, spec.num_classes, dev)
    untrained.state = dict(gen.state)
    data = FoldData(name, args.c, args.f, spec.plans_identifier)
    sampler = TrainingLabelMaps(data, spec, dataclasses.replace(cfg, label_generator=gen.cfg))
    k = gen.num_attributes
    names = {v: n for n, v in data.dataset_json["labels"].items() if n != "ignore"}
    classes = [names[v] for v in spec.label_values[1:]]

    sets = {"real": [sampler._fit(m, None) for m in sampler.maps],
            "generated": list(gen.sample(None, args.n, 1.0, gen.sampler(), torch.Generator().manual_seed(args.seed))),
            "untrained": list(untrained.sample(None, args.n, 1.0, untrained.sampler(),
                                               torch.Generator().manual_seed(args.seed)))}
    stats = {s: (np.mean([volume_fractions(m, k) for m in ms], 0), np.mean([component_counts(m, k) for m in ms], 0))
             for s, ms in sets.items()}
    print(f"{name} {args.c} fold {args.f}: {len(sets['real'])} real maps, {args.n} samples each, canvas {gen.canvas}")
    print("| class | fraction real | generated | untrained | components real | generated | untrained |")
    print("|---|---|---|---|---|---|---|")
    for i, c in enumerate(classes):
        print(f"| {c} | " + " | ".join(f"{stats[s][0][i]:.3f}" for s in sets) + " | "
              + " | ".join(f"{stats[s][1][i]:.1f}" for s in sets) + " |")

    j = classes.index(args.cls)
    train = gen.training_attributes
    low, high = np.quantile(train[:, j], [0.1, 0.9])
    base = train[np.random.default_rng(args.seed).integers(len(train), size=args.n)]
    print(f"\nvolume response of {args.cls} (asked {low:.3f} vs {high:.3f}):")
    print("| guidance w | measured at low | measured at high | response |")
    print("|---|---|---|---|")
    for w in args.guidance:
        got = []
        for value in (low, high):
            attrs = base.copy()
            attrs[:, j] = value
            maps = gen.sample(attrs, args.n, w, gen.sampler(), torch.Generator().manual_seed(args.seed + 1))
            got.append(float(np.mean([volume_fractions(m, k)[j] for m in maps])))
        print(f"| {w:g} | {got[0]:.3f} | {got[1]:.3f} | {got[1] - got[0]:+.3f} |")


if __name__ == "__main__":
    main()
