import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# CPU tests on 2 cores: busy-waiting OpenMP threads make torch up to 10x slower under contention
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")

from support import (EXAMPLE_ID, EXAMPLE_NAME, JUDGE, console_script, nnunet_env, nnunet_folders,  # noqa: E402
                     private_copy_of_example, run, train_tiny_judge, write_splits)


def pytest_configure(config):
    # pytest-xdist workers share the cores: each takes its share of torch's threads, not all of them
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _built_once(tmp_path_factory, name: str, build) -> Path:
    """A session fixture's folder, built by the first test process that asks for it: under pytest-xdist the
    workers of one run share it (each would otherwise plan or train the same thing again). ``build(folder)``
    fills the folder; a build that failed midway is redone."""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    folder = base / name
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            (folder / ".built").touch()
    return folder


def _plan_example(root: Path) -> None:
    from nnunet_diffaug.example_data import build_example_dataset
    from nnunet_diffaug.small_plans import write_small_plans
    build_example_dataset(root / "raw", EXAMPLE_ID, slab_slices=4, in_plane_size=64)
    run([console_script("nnUNetv2_plan_and_preprocess"), "-d", str(EXAMPLE_ID), "-c", "2d", "3d_fullres",
         "-np", "1", "-npfp", "1", "--verify_dataset_integrity"], nnunet_env(root))
    write_splits(root / "preprocessed" / EXAMPLE_NAME, [f"chest_{i:03d}" for i in range(8)], n_folds=2)
    with nnunet_folders(root):
        write_small_plans(EXAMPLE_NAME)


@pytest.fixture(scope="session")
def planned_example(tmp_path_factory):
    """The built-in chest CT example (8 slab cases, 64x64 in-plane), planned and preprocessed by nnU-Net's
    own console script for 2d and 3d_fullres, with small plans 'nnUNetPlansDiffAugSmall' and 2-fold splits.
    Shared by every test of the run: a test that writes into it takes a private copy
    (``support.private_copy_of_example``).

    Returns (root, splits): nnU-Net folders under root/{raw,preprocessed,results}.
    """
    root = _built_once(tmp_path_factory, "planned_example", _plan_example)
    return root, json.loads((root / "preprocessed" / EXAMPLE_NAME / "splits_final.json").read_text())


@pytest.fixture(scope="session")
def judged_example(planned_example, tmp_path_factory):
    """The planned example with a tiny nnU-Net (``support.JUDGE``: trainer, plans, configuration) trained on the
    real training cases of fold 0, the judge of the evaluation and judge-filter tests. Trained once per run;
    modules take a private copy with ``support.private_copy_of_example(..., with_results=True)``.

    Returns the root whose results folder holds the model.
    """
    def train_judge(root: Path) -> None:
        private_copy_of_example(planned_example[0], root)
        train_tiny_judge(root, JUDGE[2])

    return _built_once(tmp_path_factory, "judged_example", train_judge)
