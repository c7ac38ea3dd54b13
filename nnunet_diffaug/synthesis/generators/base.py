"""What every image generator of ``diffaug_synthesize --generator`` offers the synthesis loop.

A generator paints one label map (class indices, nnU-Net's preprocessed space) as a normalised image
(C, *spatial); the loop draws the label maps, converts to raw units and writes. Generators differ only
in how they paint, what they record, and which label modes they take.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.provenance import SyntheticProvenance
from nnunet_diffaug.synthesis.config import SamplingConfig
from nnunet_diffaug.synthesis.data import FoldData


@dataclass
class SynthesisRequest:
    """What the user asked for, as far as opening a generator goes."""
    dataset_name: str
    configuration: str
    fold: int
    labels: str
    plans_identifier: str | None = None   # None: the generator's own default (diffusion: the synthesizer's)
    device: str = "auto"
    options: dict = field(default_factory=dict)  # generator-specific flags actually given, e.g. {"--sampler": "ddim"}


@dataclass
class CaseDraw:
    """One case's label map and where it came from, before painting."""
    labels: np.ndarray                    # class indices (*spatial); a 3D volume when ``whole_volume``
    source: str | None = None             # the training case it was taken from (None: generated)
    source_slice: int | None = None       # 2D: the slice of ``source``
    source_image: np.ndarray | None = None  # (C, *spatial) normalised real image, moved like ``labels``
    augmentation: dict | None = None      # the deformation applied (``--labels real``)
    whole_volume: bool = False            # the full case volume on its own grid (``--labels real-aligned``)
    repaint: np.ndarray | None = None     # boolean region to repaint in ``source_image`` (``--labels inpaint``)
    repaint_margin: int = 0               # its margin around the edited structure (sets the feathering)
    record: dict = field(default_factory=dict)


class Generator:
    """Base class: subclasses set ``kind``/``label_modes``/``options`` and implement ``open``,
    ``generator_entry`` and ``paint``.

    ``label_modes``: the ``--labels`` modes it paints. ``options``: generator-specific flags it takes;
    the loop refuses any other such flag by name. ``needs_source_image``: whether ``paint`` wants the
    real image of the source case (moved with the labels).
    """
    kind: str = ""
    label_modes: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    needs_source_image: bool = False
    label_mode_reasons: dict[str, str] = {}  # mode -> why it is not offered (shown when refused)
    data: FoldData                        # the fold's preprocessed data the generator works from
    sampling_config: SamplingConfig       # the label deformation of --labels real

    @classmethod
    def check_request(cls, request: SynthesisRequest) -> None:
        """Refuses, before anything is read or written, what this generator cannot do."""
        if request.labels not in cls.label_modes:
            why = cls.label_mode_reasons.get(request.labels, "")
            raise DiffAugError(f"--generator {cls.kind} cannot paint --labels {request.labels}"
                               f"{': ' + why if why else ''}; it takes --labels {' or '.join(cls.label_modes)}.")
        foreign = sorted(k for k, v in request.options.items() if v is not None and k not in cls.options)
        if foreign:
            raise DiffAugError(f"{', '.join(foreign)} do(es) not apply to --generator {cls.kind}"
                               f"{' (it takes ' + ', '.join(cls.options) + ')' if cls.options else ''}.")

    @classmethod
    def open(cls, request: SynthesisRequest) -> "Generator":
        raise NotImplementedError

    @property
    def training_cases(self) -> list[str]:
        """Every real case the generator saw (the provenance's ``training_cases``)."""
        return list(self.data.training_cases)

    @property
    def synthesizer_folder(self):
        """Where a trained synthesizer (and label generator) would be; None if the generator has none."""
        return None

    def seen_data(self) -> dict | None:
        """What the generator's weights saw beyond the fold's labelled cases (the set's diffaug_seen_data.json);
        None: nothing (a generator without weights)."""
        return None

    def generator_entry(self, labels: str) -> dict:
        """The provenance's ``generator`` entry (``kind`` first): identical requests give identical dicts."""
        raise NotImplementedError

    def provenance(self, labels: str, seed: int) -> SyntheticProvenance:
        """What the trainer checks a set against (source dataset, fold, configuration, cases seen)."""
        return SyntheticProvenance(source_dataset=self.data.dataset_name, fold=self.data.fold,
                                   configuration=self.data.configuration, training_cases=self.training_cases,
                                   generator=self.generator_entry(labels), seed=seed)

    def paint(self, draw: CaseDraw, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        """(normalised image (C, *draw.labels.shape), fields for the case record)."""
        raise NotImplementedError
