"""What a DiffAug training run actually drew, epoch by epoch, against the stock trainer's budget.

Written as ``diffaug_training_stats.json`` in the fold's output folder after every epoch (atomic;
``complete`` turns true at the end of training), so a benchmark can report real and synthetic
samples seen and the extra compute of equal real exposure. A resumed run keeps the epochs recorded
before its checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

from nnunet_diffaug.file_io import atomic_write_json

STATS_FILE = "diffaug_training_stats.json"
_PER_EPOCH = ("target_ratio_per_epoch", "iterations_per_epoch", "synthetic_samples_per_epoch",
              "real_samples_per_epoch")


class TrainingStats:
    def __init__(self, trainer: str, schedule: str, ratio: float, equal_real_exposure: bool, num_epochs: int,
                 stock_iterations_per_epoch: int, batch_size: int):
        self.settings = dict(trainer=trainer, schedule=schedule, ratio=ratio, equal_real_exposure=equal_real_exposure,
                             num_epochs=num_epochs, stock_iterations_per_epoch=stock_iterations_per_epoch,
                             batch_size=batch_size)
        self.per_epoch = {k: [] for k in _PER_EPOCH}
        self.previous_wall_time_s = 0.0

    def resume_from(self, folder: str | Path, first_epoch: int) -> None:
        """Keeps the epochs before ``first_epoch`` of an earlier run with the same settings."""
        path = Path(folder) / STATS_FILE
        if first_epoch == 0 or not path.is_file():
            return
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            return
        if any(old.get(k) != v for k, v in self.settings.items() if k != "trainer"):
            return
        self.per_epoch = {k: list(old[k][:first_epoch]) for k in _PER_EPOCH}
        self.previous_wall_time_s = float(old.get("wall_time_s", 0.0))

    def record_epoch(self, target_ratio: float, iterations: int, synthetic_samples: int, real_samples: int) -> None:
        for key, value in zip(_PER_EPOCH, (target_ratio, iterations, synthetic_samples, real_samples)):
            self.per_epoch[key].append(value)

    def summary(self, wall_time_s: float, complete: bool) -> dict:
        epochs = len(self.per_epoch["iterations_per_epoch"])
        stock_iterations = self.settings["stock_iterations_per_epoch"] * epochs
        total_iterations = sum(self.per_epoch["iterations_per_epoch"])
        return {
            **self.settings,
            "epochs_recorded": epochs,
            **self.per_epoch,
            "total_iterations": total_iterations,
            "real_samples": sum(self.per_epoch["real_samples_per_epoch"]),
            "synthetic_samples": sum(self.per_epoch["synthetic_samples_per_epoch"]),
            # what the stock trainer does in as many epochs: the benchmark's reference for extra compute
            "stock_total_iterations": stock_iterations,
            "stock_real_samples": stock_iterations * self.settings["batch_size"],
            "iterations_vs_stock": total_iterations / stock_iterations if stock_iterations else None,
            "wall_time_s": round(self.previous_wall_time_s + wall_time_s, 3),
            "complete": complete,
        }

    def write(self, folder: str | Path, wall_time_s: float, complete: bool) -> dict:
        summary = self.summary(wall_time_s, complete)
        atomic_write_json(Path(folder) / STATS_FILE, summary)
        return summary
