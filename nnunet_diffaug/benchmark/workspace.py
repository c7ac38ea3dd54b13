"""The benchmark's workspace folder: linked user data, the subsets (folds), and where each result lives.

Layout (kept from the first version of the benchmark, so older workspaces resume):

- ``raw/<Dataset>`` (link) and the synthetic sets ``raw/DatasetYYY_<Task>SynthF<fold>``;
- ``preprocessed/<Dataset>/`` (links) with the benchmark's own ``splits_final.json``;
- ``results/synthesizer/`` (the fold's synthesizers), ``results/synthesizer_unlabeled/`` (those that also saw the
  pool's unlabelled remainder, ``unlabeled/fold_<f>/``), ``results/synthesizer_context/`` and
  ``results/synthesizer_consistency/`` (those of ``_context`` and ``_consistency`` arms, their configs
  ``synthesizer_context.json`` / ``synthesizer_consistency.json`` in the workspace) and ``results/<arm>/`` (one
  nnU-Net results tree per arm);
- ``benchmark_settings.json``, ``benchmark_arms.json`` (arm name -> definition),
  ``benchmark_synthetic_sets.json`` (fold and kind -> synthetic dataset), ``benchmark_timings.json``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from nnunet_diffaug.benchmark.arms import Arm, SyntheticSpec
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import atomic_write_json
from nnunet_diffaug.synthetic_sets import find_synthetic_datasets, synthetic_dataset_name

SYNTHETIC_SETS_FILE = "benchmark_synthetic_sets.json"
TIMINGS_FILE = "benchmark_timings.json"
UNLABELED_DIR = "unlabeled"                           # per fold: links to the pool's unlabelled remainder
TRAINING_STATS_FILE = "diffaug_training_stats.json"   # written by nnUNetTrainerDiffAug at the end of training
FIRST_SYNTHETIC_ID = 900


def check_inputs(dataset: str, plans: str, user_raw: Path, user_preprocessed: Path) -> None:
    """Refuses before anything is written when the dataset is not planned and preprocessed."""
    if not (user_raw / dataset / "dataset.json").is_file():
        raise DiffAugError(f"{user_raw / dataset / 'dataset.json'} does not exist: {dataset} is not a raw dataset "
                           f"in nnUNet_raw.")
    plans_file = user_preprocessed / dataset / f"{plans}.json"
    if not plans_file.is_file():
        raise DiffAugError(f"{plans_file} does not exist. Run nnUNetv2_plan_and_preprocess -d {dataset} first.")


def make_workspace(workdir: Path, dataset: str, user_raw: Path, user_preprocessed: Path) -> None:
    """Links the user's raw and preprocessed dataset into the workspace (everything except the splits)."""
    raw_link = workdir / "raw" / dataset
    raw_link.parent.mkdir(parents=True, exist_ok=True)
    if not raw_link.exists():
        raw_link.symlink_to((user_raw / dataset).resolve(), target_is_directory=True)
    pre = workdir / "preprocessed" / dataset
    pre.mkdir(parents=True, exist_ok=True)
    for item in (user_preprocessed / dataset).iterdir():
        if item.name in ("splits_final.json", "diffaug_synthetic", "diffaug_unlabeled", "diffaug_context"):  # its own
            continue
        link = pre / item.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(item.resolve(), target_is_directory=item.is_dir())


def draw_subsets(cases: list[str], settings) -> tuple[list[str], list[dict]]:
    """The fixed test set and one training subset per (size, seed); the fold index is the list index."""
    cases = sorted(cases)
    if settings.test_cases:
        missing = sorted(set(settings.test_cases) - set(cases))
        if missing:
            raise DiffAugError(f"Test case(s) {missing} are not cases of {settings.dataset}.")
        test = sorted(settings.test_cases)
    else:
        n_test = max(1, int(round(settings.test_fraction * len(cases))))
        test = sorted(np.random.default_rng(12345).choice(cases, n_test, replace=False).tolist())
    pool = [c for c in cases if c not in test]
    sizes = [(size, len(pool) if size == "all" else int(size)) for size in settings.train_sizes]
    for size, n in sizes:
        if not 1 <= n <= len(pool):
            raise DiffAugError(f"Training-set size {size} is impossible: {len(pool)} real cases remain outside "
                               f"the {len(test)} held-out test cases.")
    folds = []
    # seed-major order: rerunning a finished benchmark with more seeds only appends folds, so nothing is retrained
    for seed in settings.seeds:
        for size, n in sizes:
            rng = np.random.default_rng([int(seed), n])
            subset = sorted(rng.choice(pool, n, replace=False).tolist())
            folds.append({"size": size, "n_train": n, "seed": int(seed), "train": subset, "val": test})
    return test, folds


def write_splits(splits_file: Path, folds: list[dict]) -> None:
    splits = [{"train": f["train"], "val": f["val"]} for f in folds]
    if splits_file.is_file():
        existing = json.loads(splits_file.read_text())
        shared = min(len(existing), len(splits))
        # one a prefix of the other is the same benchmark with more (or, to report, fewer leading) seeds
        if existing[:shared] != splits[:shared]:
            raise DiffAugError(f"{splits_file} holds different subsets (other sizes, test set or seed order?). "
                               f"Add seeds at the end of --seeds, or use a new workspace folder.")
        splits = max(existing, splits, key=len)  # never drop folds another run may be training
    atomic_write_json(splits_file, splits)


def fold_folder(workdir: Path, arm: Arm, dataset: str, plans: str, configuration: str, fold: int) -> Path:
    return workdir / "results" / arm.name / dataset / f"{arm.trainer}__{plans}__{configuration}" / f"fold_{fold}"


def summary_file(workdir: Path, arm: Arm, dataset: str, plans: str, configuration: str, fold: int) -> Path:
    return fold_folder(workdir, arm, dataset, plans, configuration, fold) / "validation" / "summary.json"


def read_json_or(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


class SyntheticSets:
    """One synthetic dataset per (fold, generator, label mode), shared by every arm that trains on it.

    New sets get their dataset id here (passed to diffaug_synthesize as -o, recorded before it runs, so
    an interrupted synthesis continues into the same set); sets made by earlier versions of the
    benchmark (no -o, one diffusion set per fold) are found by their provenance.
    """

    def __init__(self, workdir: Path, dataset: str):
        self.workdir = workdir
        self.dataset = dataset
        self.file = workdir / SYNTHETIC_SETS_FILE
        self.sets = read_json_or(self.file, {})

    @staticmethod
    def key(fold: int, spec: SyntheticSpec) -> str:
        return f"fold_{fold}/{spec.key}"

    def is_complete(self, fold: int, spec: SyntheticSpec) -> bool:
        return self.sets.get(self.key(fold, spec), {}).get("complete", False)

    def name(self, fold: int, spec: SyntheticSpec) -> str:
        """The set's dataset name, assigning (and recording) one if this set is new."""
        key = self.key(fold, spec)
        if key not in self.sets:
            self.sets[key] = {"dataset": self._legacy_set(fold, spec) or self._new_name(fold), "complete": False}
            atomic_write_json(self.file, self.sets)
        return self.sets[key]["dataset"]

    def mark_complete(self, fold: int, spec: SyntheticSpec) -> None:
        self.sets[self.key(fold, spec)]["complete"] = True
        atomic_write_json(self.file, self.sets)

    def _legacy_set(self, fold: int, spec: SyntheticSpec) -> str | None:
        if (spec.generator != "diffusion" or spec.judge or spec.options or spec.unlabeled or spec.context
                or spec.consistency):  # earlier versions made plain painted sets only
            return None
        taken = {v["dataset"] for v in self.sets.values()}
        for folder in find_synthetic_datasets(self.workdir / "raw", self.dataset, fold):
            generator = read_json_or(folder / "diffaug_provenance.json", {}).get("generator", {})
            if (folder.name not in taken and "diffusion" in str(generator.get("kind", ""))
                    and generator.get("label_mode") == spec.labels and "judge_filter" not in generator):
                return folder.name
        return None

    def _new_name(self, fold: int) -> str:
        used = {int(v["dataset"][7:10]) for v in self.sets.values()}
        for root in (self.workdir / "raw", self.workdir / "preprocessed", *self.workdir.glob("results/*")):
            if root.is_dir():
                used |= {int(m[1]) for p in root.iterdir() if (m := re.match(r"Dataset(\d{3})_", p.name))}
        free = next((i for i in range(FIRST_SYNTHETIC_ID, 1000) if i not in used), None)
        if free is None:
            raise DiffAugError(f"{self.workdir}: no free nnU-Net dataset id from {FIRST_SYNTHETIC_ID} to 999 left "
                               f"for a synthetic set.")
        return synthetic_dataset_name(free, self.dataset, fold)


def unlabeled_remainder(workdir: Path, dataset: str, fold_index: int, fold: dict) -> Path:
    """A source folder for ``diffaug_train_synthesizer --unlabeled``: links to the images of the pool cases that
    were not drawn as the fold's labelled cases. A held-out test case never gets in: not by name, and not as an
    image with a test case's content (content hash; a duplicated scan in the dataset is refused)."""
    from nnunet_diffaug.raw_dataset import list_cases, load_dataset_json
    from nnunet_diffaug.unlabeled import images_equal_to
    raw = workdir / "raw" / dataset
    dataset_json = load_dataset_json(raw)
    cases = list_cases(raw, dataset_json)
    test, train = set(fold["val"]), set(fold["train"])
    remainder = {c: cases[c]["images"] for c in sorted(cases) if c not in test and c not in train}
    if not remainder:
        raise DiffAugError(f"An _unlabeled arm needs unlabelled images, but training-set size {fold['size']} leaves "
                           f"no pool case outside the {len(train)} labelled and {len(test)} test cases; use it at "
                           f"smaller --train-sizes (e.g. 2).")
    equal = images_equal_to(remainder, {c: cases[c]["images"] for c in sorted(test)}, dataset_json,
                            workdir / UNLABELED_DIR / "content_hashes.json")
    if equal:
        case, twin = next(iter(equal.items()))
        raise DiffAugError(f"Pool case {case}'s image ({remainder[case][0]}) has the same content as test case "
                           f"{twin}'s: as an unlabelled image it would show a test case to the synthesizer. Remove "
                           f"the duplicate from the dataset or pass --test-cases that include both.")
    folder = workdir / UNLABELED_DIR / f"fold_{fold_index}"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {Path(f).name: Path(f).resolve() for files in remainder.values() for f in files}
    for link in folder.iterdir():
        if link.name not in wanted or not link.is_symlink() or link.resolve() != wanted[link.name]:
            link.unlink()
    for name, target in wanted.items():
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(target)
    return folder


def record_timing(workdir: Path, arm: Arm, fold: int, seconds: float) -> None:
    file = workdir / TIMINGS_FILE
    timings = read_json_or(file, {})
    timings[f"{arm.name}/fold_{fold}"] = {"wall_time_s": round(seconds, 2)}
    atomic_write_json(file, timings)
