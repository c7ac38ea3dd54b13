"""New label maps from the fold's label generator (``diffaug_synthesize --labels generated``).

The label generator samples a map, optionally asked for class volume fractions (``--volume CLASS=LOW:HIGH``) with
guidance weight ``--guidance``; fragments below ``--min-component-voxels`` of the declared classes and of the context
classes are removed; the case record keeps what was asked and what came out.
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


class LabelMapSampler:
    """New label maps from the label generator, one per case, reproducible from the case's rng."""

    def __init__(self, generator: LabelGenerator, requests: list[VolumeRequest], guidance: float,
                 min_component_voxels: int, class_names: list[str], sampler_name: str = "dpmpp"):
        self.gen, self.requests, self.guidance = generator, requests, guidance
        self.min_component_voxels = min_component_voxels
        self.class_names = class_names  # foreground classes 1..K-1, by label name
        # the declared foreground classes and the context classes; not 'outside' (index K), which the canvas
        # padding makes and the written case crops away
        k = generator.num_attributes
        self.cleaned_classes = [*range(1, k + 1), *range(k + 2, generator.num_classes)]
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
        clean = remove_small_fragments(raw, self.min_component_voxels, self.cleaned_classes)
        return clean, {"requested_volume": [r.to_json() for r in self.requests], "guidance": self.guidance,
                       "condition_fractions": self._named(attrs), "measured_fractions": self._named(
                           volume_fractions(clean, k)),
                       "measured_components": {n: int(c) for n, c in zip(self.class_names,
                                                                         component_counts(clean, k))},
                       "fragment_voxels_relabelled": int(np.count_nonzero(raw != clean))}


def open_label_map_sampler(syn_folder, data: FoldData, device, guidance: float | None, volume: list[str] | None,
                          min_component_voxels: int) -> LabelMapSampler:
    """The fold's label generator (trained beside the image synthesizer) for ``--labels generated``.

    Only the label generator's files are needed, so image generators without a trained model use it too.
    """
    from nnunet_diffaug.synthesis.synthesizer import read_run_files
    cfg, spec, _ = read_run_files(syn_folder)
    if spec.training_cases != data.training_cases or spec.plans_identifier != data.plans_identifier:
        raise DiffAugError(f"{syn_folder}: its label generator was trained on other training cases or plans "
                           f"({spec.plans_identifier}) than fold {data.fold} of {data.folder / data.plans_identifier}"
                           f".json has now; retrain it (diffaug_train_synthesizer --overwrite) or pass its plans with -p.")
    if spec.context is not None and data.context is None:  # a painter without a model of its own (randomised)
        data.use_context(spec.context_model)
    generator = LabelGenerator.load(syn_folder, cfg.label_generator, spec.spatial_dims, spec.num_classes,
                                    len(spec.label_values) - 1, device,
                                    synthesize_hint=f"-d {spec.dataset_name} -c {spec.configuration} -f {spec.fold} ")
    names = {k: int(v) for k, v in data.dataset_json["labels"].items() if k != "ignore"}
    requests = parse_volume_requests(volume, names, spec.label_values)
    name_of_value = {v: k for k, v in names.items()}
    class_names = [name_of_value[v] for v in spec.label_values[1:]]
    lg = cfg.label_generator
    return LabelMapSampler(generator, requests, lg.guidance if guidance is None else float(guidance),
                           min_component_voxels, class_names)
