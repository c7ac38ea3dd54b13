"""``--generator diffusion``: the fold's trained label-conditioned latent diffusion synthesizer paints each case.

Besides the label map it takes the optional hints the synthesizer was trained with (edge hint, spacing tag,
per-class intensity), repaints a region for ``--labels inpaint`` (RePaint), paints whole volumes slice by slice
for ``--labels real-aligned`` with a 2D synthesizer, and by default calibrates each class to real intensities.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nnunet_diffaug import paths
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.synthesis.checkpoint import weights_sha256
from nnunet_diffaug.synthesis.class_stats import ClassIntensityPlan, normalised_value, parse_intensity_requests
from nnunet_diffaug.synthesis.data import FoldData
from nnunet_diffaug.synthesis.generators.base import CaseDraw, Generator, SynthesisRequest
from nnunet_diffaug.synthesis.intensity_calibration import calibrate_class_intensity
from nnunet_diffaug.synthesis.label_sources import LABEL_MODES
from nnunet_diffaug.synthesis.aligned_volumes import paint_volume
from nnunet_diffaug.synthesis.synthesizer import STAGES, Synthesizer, resolve_device

DEFAULT_RESAMPLE_JUMPS = 1  # RePaint redos per step: each doubles the model calls


def _hints(syn: Synthesizer, data: FoldData, source: str | None, source_image: np.ndarray | None,
           rng: np.random.Generator, spacing: list[float] | None,
           intensity: ClassIntensityPlan | None = None) -> tuple[dict, dict]:
    """The optional extra conditioning of one case: keyword arguments for painting, and its record.

    Edge hint: the source's real image edges when there is a source, else label boundaries only.
    Spacing tag: ``spacing`` if given, else the source case's acquisition spacing, else (generated maps)
    the spacing of a random training case, so the synthetic set follows the training distribution.
    Class intensity: the statistics ``intensity`` gives for the source case, else (generated maps) for
    that same random training case, so spacing and appearance come from one real case.
    """
    dcfg = syn.config.diffusion
    kwargs, record = {}, {}
    if dcfg.edge_hint:
        kwargs["edge_images"] = None if source_image is None else source_image[None]
        record["edge_hint"] = "labels" if source_image is None else "labels+image"
    real_case = source
    if real_case is None and ((dcfg.tag_conditioning and spacing is None) or intensity is not None):
        real_case = data.training_cases[int(rng.integers(len(data.training_cases)))]
    if dcfg.tag_conditioning:
        if spacing is None:
            spacing = data.acquisition_spacing(real_case)
        kwargs["spacing"] = [float(v) for v in spacing]
        record["spacing_tag"] = kwargs["spacing"]
    if intensity is not None:
        kwargs["class_stats"], record["class_intensity"] = intensity.for_case(real_case, rng)
    return kwargs, record


def _class_intensity_plan(syn: Synthesizer, data: FoldData, syn_folder: Path, jitter: float,
                          requests: list[str] | None) -> ClassIntensityPlan | None:
    """The per-class statistics plan of a synthesizer trained with ``class_intensity`` (None otherwise);
    refuses the flags for one trained without. Requested means are in the synthetic raw images' units."""
    if not syn.config.diffusion.class_intensity:
        for flag, given in (("--intensity-jitter", jitter), ("--class-intensity", requests)):
            if given:
                raise DiffAugError(f"{flag}: the synthesizer in {syn_folder} was trained without class intensity "
                                   f"conditioning (diffusion.class_intensity in its config.json), so it cannot take "
                                   f"per-class intensities.")
        return None
    names = {k: int(v) for k, v in data.dataset_json["labels"].items()}
    raw_means = parse_intensity_requests(requests, names, syn.spec.label_values, syn.spec.in_channels)
    props = data.plans_manager.foreground_intensity_properties_per_channel
    means = {k: [normalised_value(v, scheme, props.get(str(c), props.get(c)))
                 for c, (v, scheme) in enumerate(zip(m, data.cm.normalization_schemes))] for k, m in raw_means.items()}
    return _fold_statistics_plan(data, syn.spec.label_values, jitter, means)


def _fold_statistics_plan(data: FoldData, label_values: list[int], jitter: float = 0.0,
                          means: dict | None = None) -> ClassIntensityPlan:
    """Every training case's per-class statistics (the targets of conditioning and of calibration)."""
    name_of_value = {int(v): k for k, v in data.dataset_json["labels"].items()}
    class_names = [name_of_value[v] for v in label_values] + ["outside"] + (
        data.context.model.class_names() if data.context else [])
    return ClassIntensityPlan({c: data.class_intensity_stats(c) for c in data.training_cases}, class_names,
                              jitter, means)


def _outside_data(syn: Synthesizer, syn_folder: Path) -> dict:
    """Unlabelled images and init source of the synthesizer, and label guidance, recorded only when used: a set
    made with them is never a continuation of one made without (see outside_data.py)."""
    from nnunet_diffaug.synthesis.outside_data import provenance_entries
    out = provenance_entries(syn_folder)
    if syn.config.sampling.label_guidance != 1.0:
        out["label_guidance"] = float(syn.config.sampling.label_guidance)
    return out


def _extra_conditioning(syn: Synthesizer) -> dict:
    """Recorded only when on, so sets from synthesizers without them keep their provenance."""
    dcfg = syn.config.diffusion
    out = {k: True for k in ("edge_hint", "tag_conditioning", "class_intensity") if getattr(dcfg, k)}
    if syn.spec.context is not None:  # the fitted context (context.py): another set than one made without it
        out["context"] = {**syn.spec.context, "key": syn.spec.context_model.key()}
    return out


def _check_label_guidance(syn: Synthesizer, syn_folder: Path, guidance: float | None) -> None:
    """Refuses, before anything is written, label guidance (``--label-guidance``, else the config's) from a
    synthesizer whose "no label" input is missing or untrained."""
    from nnunet_diffaug.synthesis.outside_data import guidance_refusal
    weight = syn.config.sampling.label_guidance if guidance is None else float(guidance)
    why = guidance_refusal(syn_folder, syn.config, weight)
    if why is not None:
        given = (f"--label-guidance {weight:g}" if guidance is not None
                 else f"sampling.label_guidance {weight:g} in {syn_folder / 'config.json'}")
        raise DiffAugError(f"{given}: {why}")


class DiffusionGenerator(Generator):
    """The fold's trained label-conditioned latent diffusion synthesizer (``--generator diffusion``)."""
    kind = "diffusion"
    label_modes = LABEL_MODES
    options = ("--sampler", "--steps", "--spacing", "--intensity-jitter", "--class-intensity", "--resample-jumps",
               "--calibrate-intensity", "--label-guidance")

    def __init__(self, syn: Synthesizer, syn_folder: Path, data: FoldData, smp, spacing: list[float] | None,
                 intensity: ClassIntensityPlan | None = None, intensity_request: dict | None = None,
                 resample_jumps: int = DEFAULT_RESAMPLE_JUMPS, calibration: ClassIntensityPlan | None = None):
        self.syn, self._syn_folder, self.data, self.smp, self.spacing = syn, syn_folder, data, smp, spacing
        self.intensity, self.intensity_request = intensity, intensity_request
        self.resample_jumps = resample_jumps
        self.calibration = calibration  # targets of --calibrate-intensity (None: off)
        self.sampling_config = syn.config.sampling
        self.needs_source_image = syn.config.diffusion.edge_hint  # the edge hint reads the real image

    @classmethod
    def open(cls, request: SynthesisRequest) -> "DiffusionGenerator":
        syn_folder = paths.synthesizer_folder(request.dataset_name, request.configuration, request.fold)
        syn = Synthesizer.load(syn_folder, resolve_device(request.device))
        spec = syn.spec
        if request.plans_identifier not in (None, spec.plans_identifier):
            raise DiffAugError(f"-p {request.plans_identifier}: the synthesizer in {syn_folder} was trained on "
                               f"{spec.plans_identifier}; drop -p (diffusion uses the synthesizer's).")
        data = FoldData(request.dataset_name, request.configuration, request.fold, spec.plans_identifier)
        if data.training_cases != spec.training_cases:
            raise DiffAugError(f"{data.folder / 'splits_final.json'}: fold {request.fold}'s training cases changed "
                               f"since the synthesizer in {syn_folder} was trained; retrain it "
                               f"(diffaug_train_synthesizer --overwrite).")
        data.use_context(spec.context_model)  # its label maps carry the context classes the model was trained on
        spacing = request.options.get("--spacing")
        if spacing is not None and not syn.config.diffusion.tag_conditioning:
            raise DiffAugError(f"--spacing: the synthesizer in {syn_folder} was trained without tag conditioning "
                               f"(diffusion.tag_conditioning in its config.json), so it cannot take a spacing tag.")
        jitter = request.options.get("--intensity-jitter") or 0.0
        means = request.options.get("--class-intensity")
        intensity = _class_intensity_plan(syn, data, syn_folder, jitter, means)
        # another appearance request is another dataset, never a continuation
        intensity_request = {"jitter": float(jitter), "means": sorted(means or [])} if jitter or means else None
        smp = syn.sampler(request.options.get("--sampler"), request.options.get("--steps"))
        guidance = request.options.get("--label-guidance")
        _check_label_guidance(syn, syn_folder, guidance)
        if guidance is not None:  # this run's weight; the provenance records it (another set than unguided)
            try:
                syn.sampling_model(guidance)  # refuses a negative weight (the CLI allows >= 1 only)
            except DiffAugError as e:
                raise DiffAugError(f"--label-guidance: {e} ({syn_folder})") from None
            syn.config.sampling.label_guidance = float(guidance)
        jumps = request.options.get("--resample-jumps")
        calibration = None
        if request.options.get("--calibrate-intensity"):
            calibration = intensity or _fold_statistics_plan(data, syn.spec.label_values)
        return cls(syn, syn_folder, data, smp, spacing, intensity, intensity_request,
                   DEFAULT_RESAMPLE_JUMPS if jumps is None else int(jumps), calibration)

    @property
    def training_cases(self) -> list[str]:
        return list(self.syn.spec.training_cases)

    @property
    def synthesizer_folder(self) -> Path:
        return self._syn_folder

    def seen_data(self) -> dict | None:
        from nnunet_diffaug.synthesis.outside_data import seen_beyond_fold
        return seen_beyond_fold(self._syn_folder, self.data.dataset_name, self.training_cases)

    def generator_entry(self, labels: str) -> dict:
        syn, folder = self.syn, self._syn_folder
        entry = {"kind": "label_conditioned_latent_diffusion", "conditioning": syn.config.diffusion.conditioning,
                 "label_mode": labels, "config": syn.config.base, "plans_identifier": syn.spec.plans_identifier,
                 "checkpoint": str(folder.relative_to(paths.nnunet_results())),  # relative: results may move
                 "checkpoint_sha256": weights_sha256(folder, STAGES),
                 "sampler": self.smp.name, "steps": self.smp.steps,
                 "augmentation": {k: getattr(syn.config.sampling, k)
                                  for k in ("rotate_degrees", "scale_range", "translate_fraction")},
                 **_extra_conditioning(syn), **_outside_data(syn, folder)}
        if self.spacing is not None:
            entry["spacing_tag"] = [float(v) for v in self.spacing]
        if self.intensity_request is not None:
            entry["class_intensity_request"] = self.intensity_request
        if self.calibration is not None:  # another set than an uncalibrated one, never a continuation of it
            entry["calibrate_intensity"] = True
        return entry

    def paint(self, draw: CaseDraw, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        gen = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
        hint_kwargs, hint_record = _hints(self.syn, self.data, draw.source, draw.source_image, rng, self.spacing,
                                          self.intensity)
        if self.data.context is not None:  # which fitted context the label map carried (provenance: its model)
            hint_record["context"] = self.data.context.model.key()
        if draw.repaint is not None:  # inpaint: only the region is sampled, the rest is the real image
            from nnunet_diffaug.synthesis.repaint import repaint_volume
            hint_kwargs.pop("edge_images", None)  # label boundaries only: the real edges show the old structure
            image, region = repaint_volume(self.syn, draw.labels, draw.source_image, draw.repaint,
                                           draw.repaint_margin, self.smp, gen, self.resample_jumps, **hint_kwargs)
            if "edge_hint" in hint_record:
                hint_record["edge_hint"] = "labels"
            image, calibrated = self._calibrate(image, draw, hint_kwargs, rng)
            return image, {"sampler": self.smp.name, "steps": self.smp.steps, "resample_jumps": self.resample_jumps,
                           **region, **hint_record, **calibrated}
        if draw.whole_volume:  # the whole volume on the case's grid; 2D synthesizers paint it slice by slice
            image = paint_volume(self.syn, draw.labels, self.smp, gen, **hint_kwargs)
        else:
            image = self.syn.generate(draw.labels[None], self.smp, gen, **hint_kwargs)[0]  # (C, *spatial)
        image, calibrated = self._calibrate(image, draw, hint_kwargs, rng)
        return image, {"sampler": self.smp.name, "steps": self.smp.steps, **hint_record, **calibrated}

    def _calibrate(self, image: np.ndarray, draw: CaseDraw, hint_kwargs: dict,
                   rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        """--calibrate-intensity: each foreground class moved to a real case's statistics (the ones the
        model was conditioned on, when it was; else the source case's, or a random training case's)."""
        if self.calibration is None:
            return image, {}
        target, stats_case = hint_kwargs.get("class_stats"), None
        if target is None:  # drawn after painting: the painted case is the same with or without calibration
            stats_case = draw.source or self.data.training_cases[int(rng.integers(len(self.data.training_cases)))]
            target, _ = self.calibration.for_case(stats_case, rng)
        foreground = list(range(1, len(self.data.label_values)))  # class indices; 0 background, last 'outside'
        image, per_class = calibrate_class_intensity(image, draw.labels, np.asarray(target), foreground,
                                                     within=draw.repaint)
        return image, {"intensity_calibration": {"stats_case": stats_case, "classes": per_class}}
