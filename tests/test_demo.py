"""The README's first command, `diffaug_demo`, end to end with a micro budget: every step runs as a user's would."""
import json

import pytest
import torch

from support import console_script, nnunet_env, run
from test_benchmark import MICRO_SYNTHESIZER

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_prints_the_comparison(tmp_path):
    config = tmp_path / "micro_synthesizer.json"
    config.write_text(json.dumps(MICRO_SYNTHESIZER))
    out = tmp_path / "demo"
    env = nnunet_env(tmp_path / "unused")  # the demo makes and uses its own nnU-Net folders inside -o
    proc = run([console_script("diffaug_demo"), "-o", str(out), "-device", "cpu", "--epochs", "1",
                "--iterations", "2", "--n-synthetic", "2", "--synthesizer-preset", str(config)], env, timeout=1200)

    assert all(f"| 5 | {arm} |" in proc.stdout for arm in ("stock", "diffaug_r33_auto"))
    assert "differences below about 0.05 Dice are noise" in proc.stdout  # and what it means
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| 5 | diffaug_r33_auto |"))
    assert row.rstrip(" |").endswith("1.00×")  # the same iterations as stock: equal compute by construction
    # the example's labels name sides, so every arm trains and predicts without mirroring, and says so
    assert "without nnU-Net's mirroring (--no-mirroring)" in proc.stdout
    # it reads this run only and points to the record, instead of repeating past figures that drift from it
    assert "docs/measured.md" in proc.stdout and "p 0." not in proc.stdout
    bench = out / "benchmark_2d"  # the demo runs 2d unless -c 3d_fullres
    results = json.loads((bench / "benchmark_results.json").read_text())
    assert {r["arm"] for r in results["runs"]} == {"stock", "diffaug_r33_auto"}
    assert len({(r["seed"], tuple(r["train_cases"])) for r in results["runs"]}) == 1  # same seed, same cases
    test_cases = set(results["test_cases"])
    assert len(test_cases) == 3
    for r in results["runs"]:
        assert r["n_train"] == 5 and not set(r["train_cases"]) & test_cases
        assert 0.0 <= r["mean_foreground_dice"] <= 1.0
    assert (bench / "benchmark_plot.png").stat().st_size > 1000
    assert results["settings"]["mirroring"] is False
    checkpoints = list((bench / "results").glob("*/*/*/fold_*/checkpoint_final.pth"))
    assert len(checkpoints) == 2
    for checkpoint in checkpoints:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        assert saved["inference_allowed_mirroring_axes"] is None, checkpoint
    # the synthetic set came from the demo's own synthesizer, trained on the 5 training cases only
    provenance = [json.loads(p.read_text()) for p in bench.glob("raw/*/diffaug_provenance.json")]
    assert len(provenance) == 1 and not set(provenance[0]["training_cases"]) & test_cases
