"""``--generator deformed-real``: the benchmark's control, geometric augmentation without a generative model.

Each case is a training case's label map under the same random affine as ``--labels real`` applies for
the diffusion model, and the case's own real image moved by that same affine (linear interpolation).
A DiffAug arm that beats this control gains from the painted appearance, not from the extra deformed
label maps alone.

Label modes: only ``real``. ``real-aligned`` is refused: with no deformation it would write exact copies
of the training cases, which add nothing but duplicates (and a PatchMix pair of identical images merges
to the real case). ``generated`` is refused: a generated map has no real image.
"""
from __future__ import annotations

import numpy as np

from nnunet_diffaug.synthesis.config import SamplingConfig
from nnunet_diffaug.synthesis.data import FoldData
from nnunet_diffaug.synthesis.generators.base import CaseDraw, Generator, SynthesisRequest


class DeformedRealGenerator(Generator):
    kind = "deformed-real"
    label_modes = ("real",)
    needs_source_image = True
    label_mode_reasons = {
        "real-aligned": "undeformed, it would only copy the training cases (use them directly)",
        "generated": "a generated label map has no real image to deform",
        "inpaint": "repainting a region needs the trained diffusion model",
    }

    def __init__(self, data: FoldData, sampling_config: SamplingConfig | None = None):
        self.data = data
        self.sampling_config = sampling_config or SamplingConfig()  # the diffusion presets' deformation

    @classmethod
    def open(cls, request: SynthesisRequest) -> "DeformedRealGenerator":
        return cls(FoldData(request.dataset_name, request.configuration, request.fold,
                            request.plans_identifier or "nnUNetPlans"))

    def generator_entry(self, labels: str) -> dict:
        return {"kind": "deformed_real", "label_mode": labels, "plans_identifier": self.data.plans_identifier,
                "augmentation": {k: getattr(self.sampling_config, k)
                                 for k in ("rotate_degrees", "scale_range", "translate_fraction")}}

    def paint(self, draw: CaseDraw, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        return np.asarray(draw.source_image, dtype=np.float32), {}  # already moved with its labels
