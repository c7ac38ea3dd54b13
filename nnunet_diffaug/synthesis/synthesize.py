"""Label maps of the fold -> a synthetic nnU-Net raw dataset, painted by one ``--generator``.

Generators (:data:`GENERATORS`, in :mod:`generators`): ``diffusion`` (the fold's trained synthesizer),
``randomised`` and ``deformed-real`` (no training). Label maps (``--labels``): one
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

from nnunet_diffaug import env_vars, paths
from nnunet_diffaug.env_vars import env_float
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import folder_lock
from nnunet_diffaug.raw_dataset import label_values, list_cases, load_dataset_json
from nnunet_diffaug.synthetic_sets import output_folder
from nnunet_diffaug.synthetic_writer import SyntheticDatasetWriter
from nnunet_diffaug.synthesis.data import FoldData
from nnunet_diffaug.synthesis.generators.base import Generator, SynthesisRequest
from nnunet_diffaug.synthesis.generators.deformed_real import DeformedRealGenerator
from nnunet_diffaug.synthesis.generators.diffusion import DiffusionGenerator
from nnunet_diffaug.synthesis.generators.randomised import RandomisedGenerator
from nnunet_diffaug.synthesis.aligned_volumes import aligned_raw_space
from nnunet_diffaug.synthesis.label_sources import (DEFAULT_MIN_COMPONENT_VOXELS, LABEL_MODES, LABEL_SOURCES)
from nnunet_diffaug.synthesis.rawspace import RawSpace
from nnunet_diffaug.synthesis.synthesizer import resolve_device

PART_LOCK_WAIT_S = 30.0  # then refuse: the other process is doing this part's work
# Per-class intensity calibration is on by default for the diffusion generator: a small synthesizer paints thin
# structures at the wrong brightness, and cases as painted cost Dice where calibrated ones did not (docs/measured.md).
# Sets record it in their provenance only when on, so --no-calibrate-intensity continues older sets.
DEFAULT_CALIBRATED_GENERATOR = "diffusion"


def case_id_for(index: int) -> str:
    return f"synth_{index:05d}"


def _case_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


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


def _seen_data(painter: Generator, label_source) -> dict | None:
    """What the weights that make the set saw beyond the fold's labelled cases (None: nothing)."""
    from nnunet_diffaug.synthesis.outside_data import merge_seen
    parts = [s for s in (painter.seen_data(), label_source.seen_data()) if s is not None]
    return None if not parts else parts[0] if len(parts) == 1 else merge_seen(*parts)


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
               calibrate_intensity: bool | None = None, label_guidance: float | None = None) -> Path:
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
    ``label_guidance``: classifier-free guidance weight on the label map (synthesizers trained with the "no label"
    condition); ``None`` = the synthesizer config's ``sampling.label_guidance``.
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
        "--resample-jumps": resample_jumps, "--calibrate-intensity": calibrate_intensity or None,
        "--label-guidance": label_guidance})
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
    seen = _seen_data(painter, label_source)
    out_folder = output_folder(dataset_name, fold, provenance, output_id, num_parts)
    # one writer per part: a second process for the same part would only redo the same cases
    part_lock = folder_lock(out_folder, timeout_s=env_float(env_vars.LOCK_WAIT_S, PART_LOCK_WAIT_S, 0.0, 10.0 ** 6),
                                    name=f".diffaug.part{part_id}of{num_parts}.lock",
                                    holder=f"another diffaug_synthesize writing part {part_id} of {num_parts}")
    with part_lock:
        writer = SyntheticDatasetWriter(out_folder, real_dj, provenance, overwrite=overwrite, seen_data=seen)
        raw_space = RawSpace(data.plans_manager, data.cm, data.spatial_dims, data.label_values,
                             data.num_classes - data.outside_class - 1)

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
            space = aligned_raw_space(data, draw.source) if draw.whole_volume else raw_space
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
