"""Where the label maps of ``diffaug_synthesize`` come from (``--labels``): one class per mode.

A label source draws case ``i``'s label map (and, when the generator wants it, the real image moved
with it) as a :class:`CaseDraw`; the synthesis loop paints and writes it whatever the mode. A new mode
is a new class in :data:`LABEL_SOURCES`, not a new branch in the loop.

- ``real``: a training label map of the fold (seeded round robin; 2D: a slice holding foreground),
  randomly deformed with a small affine transform;
- ``real-aligned``: training case ``i mod n`` unchanged, whole volume on its own grid (for PatchMix);
- ``generated``: a new map from the fold's label generator (:mod:`label_map_sampler`);
- ``inpaint``: a real case with one structure edited and a region around it repainted (:mod:`inpainting`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.synthesis.config import SamplingConfig
from nnunet_diffaug.synthesis.data import FoldData
from nnunet_diffaug.synthesis.generators.base import CaseDraw, Generator
from nnunet_diffaug.synthesis.inpainting import InpaintLabels, parse_inpaint_settings
from nnunet_diffaug.synthesis.aligned_volumes import aligned_source
from nnunet_diffaug.synthesis.label_map_sampler import open_label_map_sampler

DEFAULT_MIN_COMPONENT_VOXELS = 5


def augment_label_map(labels: np.ndarray, rng: np.random.Generator, cfg: SamplingConfig,
                      image: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """A small random affine deformation of a class-index map (nearest neighbour, border replicated).

    ``image`` (C, *spatial), the label map's real image (for the edge hint), gets the same deformation
    (linear interpolation). Rotation only within the last two axes: in nnU-Net's transposed order the
    first axis is the out-of-plane one, often much coarser, and tilting across it would smear structures.
    """
    from monai.transforms import Affine
    dims = labels.ndim
    angle = math.radians(float(rng.uniform(-cfg.rotate_degrees, cfg.rotate_degrees)))
    zoom = float(rng.uniform(1 - cfg.scale_range, 1 + cfg.scale_range))
    shift = [float(rng.uniform(-cfg.translate_fraction, cfg.translate_fraction) * s) for s in labels.shape]
    if dims == 3:
        shift[0] = 0.0  # keep the slab where it is along the coarse axis
    rotate = (angle,) if dims == 2 else (angle, 0.0, 0.0)
    affine = Affine(rotate_params=rotate, scale_params=[zoom] * dims, translate_params=shift,
                    mode="nearest", padding_mode="border", image_only=True)
    out = affine(torch.from_numpy(labels[None].astype(np.float32)))
    out = np.rint(np.asarray(out)[0]).astype(labels.dtype)
    if image is not None:
        image = np.asarray(affine(torch.from_numpy(image.astype(np.float32)), mode="bilinear"))
    return out, image, {"rotate_degrees": math.degrees(angle), "zoom": zoom, "translate_voxels": shift}


def source_image(data: FoldData, case_id: str, z: int | None) -> np.ndarray:
    """The preprocessed (normalised) image of a training case, (C, *spatial); one slice in 2D."""
    volume = data.case(case_id)[0]
    return np.asarray(volume[...] if z is None else volume[:, z], dtype=np.float32)


def pick_source(data: FoldData, index: int, seed: int, rng: np.random.Generator) -> tuple[str, int | None, np.ndarray]:
    """Seeded round robin over the training cases; 2D: a random slice that holds foreground."""
    cases = data.training_cases
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(len(cases))
    case_id = cases[int(order[index % len(cases)])]
    volume = data.label_volume(case_id)
    if data.spatial_dims == 3:
        return case_id, None, volume
    background = {0, *range(data.outside_class, data.num_classes)}  # background, 'outside', context classes
    has_fg = [z for z in range(volume.shape[0]) if not set(np.unique(volume[z]).tolist()) <= background]
    z = int(rng.choice(has_fg)) if has_fg else int(rng.integers(volume.shape[0]))
    return case_id, z, volume[z]


class LabelSource:
    """Base class. ``mode``: the ``--labels`` value; ``options``: the flags only this mode takes."""
    mode: str = ""
    options: tuple[str, ...] = ()

    @classmethod
    def check_request(cls, options: dict) -> None:
        """Refuses, before anything is read, flags that belong to another label mode."""
        foreign = [k for k, v in options.items() if v is not None and k not in cls.options]
        if foreign:
            owners = {k: m for m, src in LABEL_SOURCES.items() for k in src.options}
            by_mode = sorted({owners.get(k, "?") for k in foreign})
            raise DiffAugError(f"{', '.join(foreign)} apply to --labels {' / '.join(by_mode)} only, "
                               f"not --labels {cls.mode}.")

    @classmethod
    def open(cls, options: dict, painter: Generator, real_dataset_json: dict, device) -> "LabelSource":
        return cls(painter.data)

    def __init__(self, data: FoldData):
        self.data = data

    def provenance(self) -> dict:
        """Entries this mode adds to the provenance's ``generator`` (a different request is another dataset)."""
        return {}

    def seen_data(self) -> dict | None:
        """What this mode's weights saw beyond the fold's labelled cases (see Generator.seen_data)."""
        return None

    def draw(self, index: int, seed: int, rng: np.random.Generator, painter: Generator) -> CaseDraw:
        raise NotImplementedError


class DeformedRealLabels(LabelSource):
    mode = "real"

    def draw(self, index, seed, rng, painter):
        source, z, label_map = pick_source(self.data, index, seed, rng)
        image = source_image(self.data, source, z) if painter.needs_source_image else None
        label_map, image, aug = augment_label_map(label_map, rng, painter.sampling_config, image)
        return CaseDraw(label_map, source, z, image, aug)


class AlignedLabels(LabelSource):
    mode = "real-aligned"

    def draw(self, index, seed, rng, painter):
        source, label_map = aligned_source(self.data, index)
        image = source_image(self.data, source, None) if painter.needs_source_image else None
        return CaseDraw(label_map, source, None, image, whole_volume=True, record={"aligned_with_source": True})


class GeneratedLabelSource(LabelSource):
    mode = "generated"
    options = ("--volume", "--guidance")

    @classmethod
    def open(cls, options, painter, real_dataset_json, device):
        return cls(painter, open_label_map_sampler(painter.synthesizer_folder, painter.data, device,
                                                   options.get("--guidance"), options.get("--volume"),
                                                   options.get("min_component_voxels", DEFAULT_MIN_COMPONENT_VOXELS)))

    def __init__(self, painter: Generator, generated):
        super().__init__(painter.data)
        self.generated, self._folder = generated, painter.synthesizer_folder

    def provenance(self):
        return {"label_generator": self.generated.provenance(self._folder)}

    def seen_data(self):
        # an init source's label generator is loaded with the same label set; it never sees images
        from nnunet_diffaug.synthesis.outside_data import seen_beyond_fold
        return seen_beyond_fold(self._folder, self.data.dataset_name, self.data.training_cases, images=False)

    def draw(self, index, seed, rng, painter):
        label_map, extra = self.generated.make(rng)
        return CaseDraw(label_map, record=extra)


class InpaintLabelSource(LabelSource):
    mode = "inpaint"
    options = ("--classes", "--host", "--edit", "--margin", "--scale-range", "--resample-jumps")

    @classmethod
    def open(cls, options, painter, real_dataset_json, device):
        # flags checked against the dataset's labels before anything is written
        settings = parse_inpaint_settings(options.get("--classes"), options.get("--host"), options.get("--edit"),
                                          options.get("--margin"), options.get("--scale-range"), real_dataset_json,
                                          painter.data.label_values)
        return cls(painter, settings)

    def __init__(self, painter: Generator, settings):
        super().__init__(painter.data)
        self.settings = settings
        self.labels = InpaintLabels(painter.data, settings, painter.data.spatial_dims)
        self._resample_jumps = getattr(painter, "resample_jumps", None)

    def provenance(self):
        return {"inpaint": {**self.settings.to_json(), "resample_jumps": self._resample_jumps}}

    def draw(self, index, seed, rng, painter):
        # a real case whole, one structure edited; the real image is always needed (outside the region it is kept)
        source = self.labels.source_for(index)
        original = self.data.label_volume(source)
        edit = self.labels.edit(original, rng, source)
        # on the source's grid; PatchMix may pair it with its source only where the labels did not move (keep)
        aligned = bool(np.array_equal(edit.labels, original))
        return CaseDraw(edit.labels, source, None, source_image(self.data, source, None), whole_volume=True,
                        repaint=edit.repaint, repaint_margin=self.settings.margin,
                        record={"inpaint": edit.record, "aligned_with_source": aligned})


LABEL_SOURCES: dict[str, type[LabelSource]] = {
    src.mode: src for src in (DeformedRealLabels, GeneratedLabelSource, AlignedLabels, InpaintLabelSource)}
LABEL_MODES = tuple(LABEL_SOURCES)
