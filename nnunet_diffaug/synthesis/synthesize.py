"""Label maps of the fold -> a synthetic nnU-Net raw dataset, painted by one ``--generator``.

Generators (:data:`GENERATORS`): ``diffusion`` (the fold's trained synthesizer, below), ``randomised``
and ``deformed-real`` (:mod:`generators`, no training). Label maps (``--labels``): one
:class:`~label_sources.LabelSource` per mode (:mod:`label_sources`: ``real``, ``real-aligned``,
``generated``, ``inpaint``).

Case ``i``: the label source draws its label map, the generator paints an image for it, and both are
written in raw units. Everything random about case ``i`` derives from ``(seed, i)``, so sharding with
``-num_parts/-part_id`` or resuming gives identical cases.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from nnunet_diffaug import env_vars, paths
from nnunet_diffaug.env_vars import env_float
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import folder_lock
from nnunet_diffaug.provenance import SyntheticProvenance
from nnunet_diffaug.raw_dataset import label_values, list_cases, load_dataset_json
from nnunet_diffaug.synthetic_sets import output_folder
from nnunet_diffaug.synthetic_writer import SyntheticDatasetWriter
from nnunet_diffaug.synthesis.checkpoint import weights_sha256
from nnunet_diffaug.synthesis.class_stats import ClassIntensityPlan, normalised_value, parse_intensity_requests
from nnunet_diffaug.synthesis.data import FoldData
from nnunet_diffaug.synthesis.generators.base import CaseDraw, Generator, SynthesisRequest
from nnunet_diffaug.synthesis.generators.deformed_real import DeformedRealGenerator
from nnunet_diffaug.synthesis.generators.randomised import RandomisedGenerator
from nnunet_diffaug.synthesis.label_modes import aligned_raw_space, paint_volume
from nnunet_diffaug.synthesis.intensity_calibration import calibrate_class_intensity
from nnunet_diffaug.synthesis.label_sources import (DEFAULT_MIN_COMPONENT_VOXELS, LABEL_MODES, LABEL_SOURCES)
from nnunet_diffaug.synthesis.rawspace import RawSpace
from nnunet_diffaug.synthesis.synthesizer import STAGES, Synthesizer, resolve_device

PART_LOCK_WAIT_S = 30.0  # then refuse: the other process is doing this part's work
DEFAULT_RESAMPLE_JUMPS = 1  # RePaint redos per step: each doubles the model calls
# Per-class intensity calibration is on by default for the diffusion generator: a small synthesizer paints thin
# structures at the wrong brightness, and cases as painted cost Dice where calibrated ones did not (docs/measured.md).
# Sets record it in their provenance only when on, so --no-calibrate-intensity continues older sets.
DEFAULT_CALIBRATED_GENERATOR = "diffusion"


def case_id_for(index: int) -> str:
    return f"synth_{index:05d}"


def _case_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


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
    class_names = [name_of_value[v] for v in label_values] + ["outside"]
    return ClassIntensityPlan({c: data.class_intensity_stats(c) for c in data.training_cases}, class_names,
                              jitter, means)


def _real_dataset_json(dataset_name: str, data: FoldData) -> dict:
    raw = paths.nnunet_raw() / dataset_name
    if (raw / "dataset.json").is_file():
        return load_dataset_json(raw)
    return load_dataset_json(data.folder)  # nnU-Net keeps a copy beside the plans


MONTAGE_FILE = "diffaug_montage.png"


def write_montage(folder: Path, dataset_json: dict, max_cases: int = 8) -> None:
    """A PNG of the first complete cases (middle slice, first channel) with their labels overlaid."""
    import SimpleITK as sitk
    from nnunet_diffaug.synthesis.plotting import save_montage
    cases = list(list_cases(folder, dataset_json).items())[:max_cases]
    if not cases:
        return
    images = [sitk.GetArrayFromImage(sitk.ReadImage(c["images"][0])) for _, c in cases]
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(c["label"])) for _, c in cases]
    lo, hi = np.percentile(np.concatenate([i.ravel() for i in images]), [1, 99])
    save_montage(folder / MONTAGE_FILE, [("synthetic", images)], labels, max(label_values(dataset_json)) + 1,
                 f"{folder.name}: {', '.join(cid for cid, _ in cases)}", float(lo), float(hi))


def _provenance(syn: Synthesizer, syn_folder: Path, smp, labels: str, seed: int) -> SyntheticProvenance:
    """What the trainer needs to trust the set; identical requests give identical provenance (so reruns continue)."""
    spec = syn.spec
    return SyntheticProvenance(
        source_dataset=spec.dataset_name, fold=spec.fold, configuration=spec.configuration,
        training_cases=list(spec.training_cases),
        generator={"kind": "label_conditioned_latent_diffusion", "conditioning": syn.config.diffusion.conditioning,
                   "label_mode": labels, "config": syn.config.base, "plans_identifier": spec.plans_identifier,
                   "checkpoint": str(syn_folder.relative_to(paths.nnunet_results())),  # relative: results may move
                   "checkpoint_sha256": weights_sha256(syn_folder, STAGES),
                   "sampler": smp.name, "steps": smp.steps,
                   "augmentation": {k: getattr(syn.config.sampling, k)
                                    for k in ("rotate_degrees", "scale_range", "translate_fraction")},
                   **_extra_conditioning(syn), **_outside_data(syn, syn_folder)},
        seed=seed)


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
    return {k: True for k in ("edge_hint", "tag_conditioning", "class_intensity") if getattr(dcfg, k)}


class DiffusionGenerator(Generator):
    """The fold's trained label-conditioned latent diffusion synthesizer (``--generator diffusion``)."""
    kind = "diffusion"
    label_modes = LABEL_MODES
    options = ("--sampler", "--steps", "--spacing", "--intensity-jitter", "--class-intensity", "--resample-jumps",
               "--calibrate-intensity")

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
            raise DiffAugError(f"-plans {request.plans_identifier}: the synthesizer in {syn_folder} was trained on "
                               f"{spec.plans_identifier}; drop -plans (diffusion uses the synthesizer's).")
        data = FoldData(request.dataset_name, request.configuration, request.fold, spec.plans_identifier)
        if data.training_cases != spec.training_cases:
            raise DiffAugError(f"{data.folder / 'splits_final.json'}: fold {request.fold}'s training cases changed "
                               f"since the synthesizer in {syn_folder} was trained; retrain it "
                               f"(diffaug_train_synthesizer --overwrite).")
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

    def provenance(self, labels: str, seed: int) -> SyntheticProvenance:
        provenance = _provenance(self.syn, self._syn_folder, self.smp, labels, seed)
        if self.spacing is not None:
            provenance.generator["spacing_tag"] = [float(v) for v in self.spacing]
        if self.intensity_request is not None:
            provenance.generator["class_intensity_request"] = self.intensity_request
        if self.calibration is not None:  # another set than an uncalibrated one, never a continuation of it
            provenance.generator["calibrate_intensity"] = True
        return provenance

    def paint(self, draw: CaseDraw, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        gen = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
        hint_kwargs, hint_record = _hints(self.syn, self.data, draw.source, draw.source_image, rng, self.spacing,
                                          self.intensity)
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


# ``--generator`` name -> implementation; each refuses the label modes and flags it cannot take
GENERATORS: dict[str, type[Generator]] = {
    "diffusion": DiffusionGenerator,
    "randomised": RandomisedGenerator,
    "deformed-real": DeformedRealGenerator,
}


def synthesize(dataset: str | int, configuration: str, fold: int, num_cases: int, labels: str = "real",
               sampler: str | None = None, steps: int | None = None, seed: int = 0, num_parts: int = 1,
               part_id: int = 0, output_id: int | None = None, overwrite: bool = False, device: str = "auto",
               progress: bool = True, verbose: bool = False, guidance: float | None = None,
               volume: list[str] | None = None,
               min_component_voxels: int = DEFAULT_MIN_COMPONENT_VOXELS, spacing: list[float] | None = None,
               generator: str = "diffusion", plans_identifier: str | None = None,
               randomisation: str | None = None, class_prior: str | None = None, role: str | None = None,
               intensity_jitter: float = 0.0, class_intensity: list[str] | None = None, classes: str | None = None,
               host: str | None = None, edit: str | None = None, margin: int | None = None,
               scale_range: str | None = None, resample_jumps: int | None = None,
               calibrate_intensity: bool | None = None) -> Path:
    """Writes (or continues) a synthetic raw dataset of the fold painted by ``generator``. Returns its folder.

    ``spacing``: acquisition-spacing tag for every case (synthesizers trained with tag conditioning).
    ``plans_identifier``: the preprocessed data of generators without a synthesizer (default nnUNetPlans).
    ``randomisation``: JSON file of :class:`RandomisationRanges` (``generator="randomised"``); ``class_prior``
    (``"uniform"`` or ``"real"``) overrides its class intensity prior.
    ``intensity_jitter``, ``class_intensity``: per-class appearance (synthesizers trained with class
    intensity): random shifts in units of the fold's between-case sd, and ``CLASS=MEAN`` requests.
    ``role``: recorded in the provenance; ``provenance.CANDIDATES_ROLE`` hides the set from trainers (judge candidates).
    ``classes``, ``host``, ``edit``, ``margin``, ``scale_range``, ``resample_jumps``: ``labels="inpaint"``
    (see :mod:`inpainting`; comma-separated class names/values and edits, scale as ``LOW:HIGH``).
    ``calibrate_intensity``: move every foreground class to a real case's intensity statistics after
    painting (:mod:`intensity_calibration`); ``None`` = on for the diffusion generator, the only one it applies to.
    """
    if generator not in GENERATORS:
        raise DiffAugError(f"--generator {generator!r} is not available; choose one of {tuple(GENERATORS)}.")
    if labels not in LABEL_MODES:
        raise DiffAugError(f"--labels {labels!r} is not available; choose one of {LABEL_MODES}.")
    label_options = {"--volume": volume, "--guidance": guidance, "--classes": classes, "--host": host,
                     "--edit": edit, "--margin": margin, "--scale-range": scale_range, "--resample-jumps": resample_jumps}
    source_kind = LABEL_SOURCES[labels]
    source_kind.check_request(label_options)  # flags of other label modes: refused before any reading
    if resample_jumps is not None and (int(resample_jumps) != resample_jumps or resample_jumps < 0):
        raise DiffAugError(f"--resample-jumps {resample_jumps}: give a whole number >= 0 (0 = plain RePaint blending).")
    if guidance is not None and guidance < 0:
        raise DiffAugError(f"--guidance {guidance}: the guidance weight must be >= 0 (1 = no extra guidance).")
    if min_component_voxels < 0:
        raise DiffAugError(f"--min-component-voxels {min_component_voxels} must be >= 0 (0 keeps every fragment).")
    if spacing is not None and (len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing)):
        raise DiffAugError(f"--spacing {spacing}: give three positive spacings in mm (nnU-Net's axis order, as in "
                           f"dataset_fingerprint.json).")
    if not (math.isfinite(intensity_jitter) and intensity_jitter >= 0):
        raise DiffAugError(f"--intensity-jitter {intensity_jitter}: give a scale >= 0 (0 = the real cases' "
                           f"intensities).")
    if num_cases < 1:
        raise DiffAugError(f"-n {num_cases}: ask for at least one case.")
    if steps is not None and steps < 1:
        raise DiffAugError(f"--steps {steps}: a sampler needs at least 1 step.")
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise DiffAugError(f"-part_id {part_id} must be in 0..{num_parts - 1} (-num_parts {num_parts}).")
    if calibrate_intensity is None:
        calibrate_intensity = generator == DEFAULT_CALIBRATED_GENERATOR
    kind = GENERATORS[generator]
    dataset_name = paths.resolve_dataset_name(dataset)
    request = SynthesisRequest(dataset_name, configuration, fold, labels, plans_identifier, device, options={
        "--sampler": sampler, "--steps": steps, "--spacing": spacing, "--randomisation": randomisation,
        "--class-prior": class_prior,
        "--intensity-jitter": intensity_jitter or None, "--class-intensity": class_intensity or None,
        "--resample-jumps": resample_jumps, "--calibrate-intensity": calibrate_intensity or None})
    kind.check_request(request)  # flags and label modes this generator cannot take: refused before any reading
    dev = resolve_device(device)
    painter = kind.open(request)
    data = painter.data
    real_dj = _real_dataset_json(dataset_name, data)
    provenance = painter.provenance(labels, seed)
    if role is not None:
        provenance.generator["role"] = role
    label_source = source_kind.open({**label_options, "min_component_voxels": min_component_voxels}, painter,
                                    real_dj, dev)
    provenance.generator.update(label_source.provenance())
    out_folder = output_folder(dataset_name, fold, provenance, output_id, num_parts)
    # one writer per part: a second process for the same part would only redo the same cases
    part_lock = folder_lock(out_folder, timeout_s=env_float(env_vars.LOCK_WAIT_S, PART_LOCK_WAIT_S, 0.0, 10.0 ** 6),
                                    name=f".diffaug.part{part_id}of{num_parts}.lock",
                                    holder=f"another diffaug_synthesize writing part {part_id} of {num_parts}")
    with part_lock:
        writer = SyntheticDatasetWriter(out_folder, real_dj, provenance, overwrite=overwrite)
        raw_space = RawSpace(data.plans_manager, data.cm, data.spatial_dims, data.label_values)

        mine = [i for i in range(num_cases) if i % num_parts == part_id]
        todo = [i for i in mine if not writer.has_case(case_id_for(i))]
        if verbose:
            print(f"{out_folder}: {len(mine) - len(todo)} of this part's {len(mine)} case(s) exist, writing {len(todo)}")
        from tqdm import tqdm
        for i in tqdm(todo, desc="synthesizing", disable=not progress, dynamic_ncols=True):
            rng = _case_rng(seed, i)
            t0 = time.perf_counter()
            draw = label_source.draw(i, seed, rng, painter)
            image, painted = painter.paint(draw, rng)  # (C, *spatial), normalised
            # real-aligned: the whole volume, on the case's own grid
            space = aligned_raw_space(data, draw.source, data.label_values) if draw.whole_volume else raw_space
            channels, label_img, notes = space.convert(image, draw.labels)
            seconds = time.perf_counter() - t0
            record = {"case_id": case_id_for(i), "index": i, "generator": painter.kind, "source_case": draw.source,
                      "source_slice": draw.source_slice, "label_mode": labels, "augmentation": draw.augmentation,
                      "seed": seed, "seconds": round(seconds, 3), "notes": notes, **draw.record, **painted}
            writer.write_case(case_id_for(i), channels, label_img, record)
        n = writer.finalize()
        if todo:
            write_montage(out_folder, real_dj)
    if verbose:
        print(f"{out_folder}: {n} complete case(s)")
    return out_folder
