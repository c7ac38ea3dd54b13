"""Where ``diffaug_synthesize`` takes label maps from, beyond deformed real ones.

- ``generated``: the fold's label generator samples a new map, optionally asked for class volume
  fractions (``--volume CLASS=LOW:HIGH``) with guidance weight ``--guidance``; tiny fragments are
  removed; the case record keeps what was asked and what came out.
- ``real-aligned``: case ``i`` is training case ``i mod n`` (sorted ids), its preprocessed label map
  unchanged, so the synthetic variant lies on the same voxel grid as the real case (what PatchMix
  pairs). 2D synthesizers paint every slice (in batches) and stack them into a full volume.
"""
from __future__ import annotations

import numpy as np
import torch

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.synthesis.checkpoint import weights_sha256
from nnunet_diffaug.synthesis.data import FoldData
from nnunet_diffaug.synthesis.label_attributes import (VolumeRequest, component_counts, draw_attributes,
                                                       parse_volume_requests, remove_small_fragments,
                                                       volume_fractions)
from nnunet_diffaug.synthesis.label_generator import LABEL_STAGES, LabelGenerator
from nnunet_diffaug.synthesis.rawspace import RawSpace

ALIGNED_SLICE_BATCH = 8  # 2D slices painted per call: bounded memory on long volumes


class GeneratedLabels:
    """New label maps from the label generator, one per case, reproducible from the case's rng."""

    def __init__(self, generator: LabelGenerator, requests: list[VolumeRequest], guidance: float,
                 min_component_voxels: int, class_names: list[str], sampler_name: str = "dpmpp"):
        self.gen, self.requests, self.guidance = generator, requests, guidance
        self.min_component_voxels = min_component_voxels
        self.class_names = class_names  # foreground classes 1..K-1, by label name
        self.sampler = generator.sampler(sampler_name)

    def provenance(self, folder) -> dict:
        return {"guidance": self.guidance, "volume_requests": [r.to_json() for r in self.requests],
                "min_component_voxels": self.min_component_voxels, "sampler": self.sampler.name,
                "steps": self.sampler.steps, "canvas": self.gen.canvas,
                "checkpoint_sha256": weights_sha256(folder, LABEL_STAGES)}

    def _named(self, values) -> dict:
        return {n: round(float(v), 6) for n, v in zip(self.class_names, values)}

    def make(self, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        """(class-index map (*canvas), record fields)."""
        attrs = draw_attributes(self.requests, self.gen.training_attributes, rng)
        gen = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
        raw = self.gen.sample(attrs[None], 1, self.guidance, self.sampler, gen)[0]
        k = self.gen.num_attributes
        clean = remove_small_fragments(raw, self.min_component_voxels, k)
        return clean, {"requested_volume": [r.to_json() for r in self.requests], "guidance": self.guidance,
                       "condition_fractions": self._named(attrs), "measured_fractions": self._named(
                           volume_fractions(clean, k)),
                       "measured_components": {n: int(c) for n, c in zip(self.class_names,
                                                                         component_counts(clean, k))},
                       "fragment_voxels_relabelled": int(np.count_nonzero(raw != clean))}


def open_generated_labels(syn_folder, data: FoldData, device, guidance: float | None, volume: list[str] | None,
                          min_component_voxels: int) -> GeneratedLabels:
    """The fold's label generator (trained beside the image synthesizer) for ``--labels generated``.

    Only the label generator's files are needed, so image generators without a trained model use it too.
    """
    from nnunet_diffaug.synthesis.synthesizer import read_run_files
    cfg, spec, _ = read_run_files(syn_folder)
    if spec.training_cases != data.training_cases or spec.plans_identifier != data.plans_identifier:
        raise DiffAugError(f"{syn_folder}: its label generator was trained on other training cases or plans "
                           f"({spec.plans_identifier}) than fold {data.fold} of {data.folder / data.plans_identifier}"
                           f".json has now; retrain it (diffaug_train_synthesizer --overwrite) or pass its plans with -plans.")
    generator = LabelGenerator.load(syn_folder, cfg.label_generator, spec.spatial_dims, spec.num_classes, device,
                                    synthesize_hint=f"-d {spec.dataset_name} -c {spec.configuration} -f {spec.fold} ")
    names = {k: int(v) for k, v in data.dataset_json["labels"].items() if k != "ignore"}
    requests = parse_volume_requests(volume, names, spec.label_values)
    name_of_value = {v: k for k, v in names.items()}
    class_names = [name_of_value[v] for v in spec.label_values[1:]]
    lg = cfg.label_generator
    return GeneratedLabels(generator, requests, lg.guidance if guidance is None else float(guidance),
                           min_component_voxels, class_names)


def aligned_source(data: FoldData, index: int) -> tuple[str, np.ndarray]:
    """Training case ``index mod n`` (sorted ids) and its unchanged class-index label volume."""
    case_id = data.training_cases[index % len(data.training_cases)]
    return case_id, data.label_volume(case_id)


def paint_volume(syn, volume_labels: np.ndarray, sampler, generator: torch.Generator,
                 edge_images: np.ndarray | None = None, spacing=None, class_stats=None) -> np.ndarray:
    """(*spatial 3D) class indices -> (C, *spatial) normalised image; 2D synthesizers paint slice batches.

    ``edge_images``: (1, C, *spatial) real image of the volume for the edge hint; ``spacing``: its tag;
    ``class_stats``: the volume's per-class intensity statistics (the same for every slice).
    """
    if syn.spec.spatial_dims == 3:
        return syn.generate(volume_labels[None], sampler, generator, edge_images=edge_images, spacing=spacing,
                            class_stats=class_stats)[0]
    parts = []
    for z in range(0, volume_labels.shape[0], ALIGNED_SLICE_BATCH):
        slices = None if edge_images is None else edge_images[0][:, z:z + ALIGNED_SLICE_BATCH].transpose(1, 0, 2, 3)
        parts.append(syn.generate(volume_labels[z:z + ALIGNED_SLICE_BATCH], sampler, generator,
                                  edge_images=slices, spacing=spacing, class_stats=class_stats))
    return np.concatenate(parts, axis=0).transpose(1, 0, 2, 3)  # (Z, C, H, W) -> (C, Z, H, W)


def aligned_raw_space(data: FoldData, case_id: str, label_values: list[int]) -> RawSpace:
    """A 3D RawSpace on the case's preprocessed grid. 2D plans keep each case's own spacing along the first
    (transposed) axis, so that axis takes the case's spacing: nnU-Net then preprocesses it to the same shape."""
    if data.spatial_dims == 3:
        return RawSpace(data.plans_manager, data.cm, 3, label_values)
    space = RawSpace(data.plans_manager, data.cm, 3, label_values)
    props = data.case(case_id)[2]
    first_axis = float(props["spacing"][data.plans_manager.transpose_forward[0]])
    space.spacing = [first_axis] + [float(s) for s in data.cm.spacing[-2:]]
    return space
