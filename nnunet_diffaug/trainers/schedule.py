"""How the synthetic share r changes over training epochs, and the iterations that keep real exposure equal.

Spelled as one string:
- ``constant``: r in every epoch;
- ``linear``: r at epoch 0, decaying linearly to 0 at the last epoch;
- ``cutoff:F`` (F in (0, 1]): r in the first fraction F of the epochs, then 0 (pre-train on the
  mix, finish on real data only);
- ``auto`` (the trainer's default): ``cutoff:0.75`` when the fold trains on at most ``FEW_REAL_CASES`` real
  cases, ``constant`` otherwise. Measured on the built-in example (100 x 25 iterations, 3 seeds, Dice pooled
  over held-out cases): with 2 real training cases the cut-off tied stock nnU-Net where the constant share fell
  below it, and was ahead of the constant share in 5 of 6 paired seeds over 2d and 3d_fullres (not
  significantly); with 5 the constant share was ahead. Sizes 3 and 4 were not measured: the threshold sits
  between the two measured sizes.

Pure functions, no nnU-Net: the trainer asks for the share of each epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from nnunet_diffaug.errors import DiffAugError

SCHEDULE_SPELLINGS = "'auto', 'constant', 'linear' or 'cutoff:F' with F in (0, 1], e.g. 'cutoff:0.5'"
FEW_REAL_CASES = 3   # 'auto' cuts the synthetic cases off late in training at this many real training cases or fewer
FEW_CASES_CUTOFF = 0.75


@dataclass(frozen=True)
class Schedule:
    kind: str                     # 'auto', 'constant', 'linear' or 'cutoff'
    fraction: float | None = None  # cutoff only: share of the epochs that mix synthetic cases

    def resolve(self, real_training_cases: int) -> "Schedule":
        """The schedule to train with on a fold of ``real_training_cases`` real cases ('auto' chooses)."""
        if self.kind != "auto":
            return self
        if real_training_cases <= FEW_REAL_CASES:
            return Schedule("cutoff", FEW_CASES_CUTOFF)
        return Schedule("constant")

    def ratio(self, base_ratio: float, epoch: int, num_epochs: int) -> float:
        """Target synthetic share of ``epoch`` (0-based) in a run of ``num_epochs`` epochs."""
        if self.kind == "auto":
            raise ValueError("an 'auto' schedule has no share until resolve() has seen the number of real cases")
        if not 0 <= epoch < num_epochs:
            raise ValueError(f"epoch {epoch} outside a run of {num_epochs} epochs")
        if self.kind == "constant":
            return base_ratio
        if self.kind == "linear":
            return base_ratio if num_epochs == 1 else base_ratio * (1 - epoch / (num_epochs - 1))
        return base_ratio if epoch < self.fraction * num_epochs else 0.0

    def __str__(self) -> str:
        return f"cutoff:{self.fraction:g}" if self.kind == "cutoff" else self.kind


def parse_schedule(text: str, source: str) -> Schedule:
    """``source`` names where the text came from (an environment variable, a class attribute), for the error."""
    spelled = str(text).strip().lower()
    if spelled in ("auto", "constant", "linear"):
        return Schedule(spelled)
    kind, _, value = spelled.partition(":")
    if kind == "cutoff":
        try:
            fraction = float(value)
        except ValueError:
            fraction = None
        if fraction is not None and 0 < fraction <= 1:
            return Schedule("cutoff", fraction)
        raise DiffAugError(f"{source}={text!r}: the cutoff fraction must be a number in (0, 1], "
                           f"e.g. 'cutoff:0.5'.")
    raise DiffAugError(f"{source}={text!r} is not a synthetic-share schedule: use {SCHEDULE_SPELLINGS}.")


def equal_exposure_iterations(stock_iterations: int, ratio: float) -> int:
    """Iterations that draw as many real samples at synthetic share ``ratio`` as ``stock_iterations``
    draw without synthetic cases: stock / (1 - r), rounded half up (at least 1)."""
    if not 0 <= ratio < 1:
        raise DiffAugError(f"Equal real exposure needs a synthetic share r < 1 (got r = {ratio:g}): at r = 1 a "
                           f"batch holds no real sample, so no number of iterations matches the stock budget. "
                           f"Lower DIFFAUG_SYNTHETIC_RATIO or unset DIFFAUG_EQUAL_REAL_EXPOSURE.")
    return max(1, math.floor(stock_iterations / (1 - ratio) + 0.5))
