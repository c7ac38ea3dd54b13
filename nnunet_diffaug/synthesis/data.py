"""Training samples from nnU-Net's preprocessed data: the training cases of one fold, one configuration.

Everything happens in nnU-Net's preprocessed space (target spacing, transposed axes, normalised
intensities). 2D configurations use slices along the first (transposed) axis, as nnU-Net does.

Label maps are encoded as class indices: declared label value ``v`` -> its rank among the declared
values; nnU-Net's ``-1`` ("outside the nonzero region", written by its cropping) -> one extra
class, so the generator learns to paint the zero background there. With context on (:mod:`context`),
the context classes follow "outside" and replace background voxels.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from nnunet_diffaug import paths
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import read_json
from nnunet_diffaug.raw_dataset import ensure_default_split, read_fold

OUTSIDE_LABEL = -1   # nnU-Net's marker for voxels outside the nonzero mask


@dataclass
class DataSpec:
    """What the synthesizer learned from: recorded with the checkpoint, checked on resume and at synthesis."""
    dataset_name: str
    configuration: str
    plans_identifier: str
    fold: int
    training_cases: list[str]
    spatial_dims: int
    in_channels: int
    label_values: list[int]            # declared values, background first (class index = position)
    normalization_schemes: list[str]
    intensity_min: list[float]         # per channel, normalised space: decoded images are clamped to this
    intensity_max: list[float]
    patch_size: list[int]              # training crop actually used (a multiple of the config's divisor)
    context: dict | None = None        # the fitted context.ContextModel (None: no context classes)

    @property
    def outside_class(self) -> int:    # nnU-Net's "outside the nonzero region"
        return len(self.label_values)

    @property
    def context_model(self):
        from nnunet_diffaug.synthesis.context import ContextModel
        return ContextModel.from_json(self.context, "synthesizer.json")

    @property
    def num_classes(self) -> int:      # declared labels + "outside" + context classes
        model = self.context_model
        return len(self.label_values) + 1 + (model.num_classes if model else 0)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        if out["context"] is None:  # absent, as in files from before context: those runs still resume
            del out["context"]
        return out

    @classmethod
    def from_json(cls, obj: dict, where: str) -> "DataSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {"context"}  # added later: files from before it had no context
        missing = sorted(names - set(obj) - optional)
        if missing:
            raise DiffAugError(f"{where} lacks field(s) {missing}; it was not written by this version.")
        return cls(**{k: obj[k] for k in names if k in obj})


class FoldData:
    """The preprocessed training cases of one fold, read lazily (blosc2 slices only what a crop needs)."""

    def __init__(self, dataset: str | int, configuration: str, fold: int | None,
                 plans_identifier: str = "nnUNetPlans"):
        """``fold`` None: the plans, labels and channels only, no fold's cases (``--unlabeled-only``)."""
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.dataset_name = paths.resolve_dataset_name(dataset)
        self.configuration = configuration
        self.fold = None if fold is None else int(fold)
        self.plans_identifier = plans_identifier
        self.folder = paths.nnunet_preprocessed() / self.dataset_name
        plans_file = self.folder / f"{plans_identifier}.json"
        plans = read_json(plans_file, f"run nnUNetv2_plan_and_preprocess -d {self.dataset_name} -c {configuration} "
                                      f"first (or pass the right -plans).")
        self.plans_manager = PlansManager(plans)
        if configuration not in self.plans_manager.available_configurations:
            raise DiffAugError(f"{plans_file} has no configuration {configuration!r}; available: "
                               f"{self.plans_manager.available_configurations}.")
        self.cm = self.plans_manager.get_configuration(configuration)
        if self.cm.previous_stage_name is not None:
            raise DiffAugError(f"{plans_file}: configuration {configuration!r} is a cascade stage; train the "
                               f"synthesizer on {self.cm.previous_stage_name!r} or 3d_fullres instead.")
        self.spatial_dims = len(self.cm.patch_size)
        self.data_folder = self.folder / self.cm.data_identifier
        self.dataset_json = read_json(self.folder / "dataset.json", "rerun nnUNetv2_plan_and_preprocess.")
        labels = self.dataset_json["labels"]
        if any(isinstance(v, (list, tuple)) for v in labels.values()):
            raise DiffAugError(f"{self.folder / 'dataset.json'}: region-based labels are not supported.")
        if "ignore" in labels:
            raise DiffAugError(f"{self.folder / 'dataset.json'} declares an 'ignore' label (sparse annotation): "
                               f"the synthesizer needs fully labelled maps to condition on.")
        self.label_values = sorted(labels.values())
        self.in_channels = len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))
        self.training_cases = [] if fold is None else self._training_cases()
        self._lut = self._label_lookup()
        self._cases: dict[str, tuple] = {}
        self._class_stats: dict[str, np.ndarray] = {}
        self.context = None  # a context.ContextCache once use_context() is called

    # ------------------------------------------------------------------ fold and cases
    def _training_cases(self) -> list[str]:
        if not self.data_folder.is_dir():
            raise DiffAugError(f"{self.data_folder} does not exist: run nnUNetv2_plan_and_preprocess -d "
                               f"{self.dataset_name} -c {self.configuration} first.")
        if ensure_default_split(self.folder, self.data_folder):
            print(f"Created nnU-Net's default 5-fold split (what nnUNetv2_train would write): "
                  f"{self.folder / 'splits_final.json'}", flush=True)
        cases = read_fold(self.folder, self.fold)[0]
        missing = [c for c in cases if not (self.data_folder / f"{c}.b2nd").is_file()
                   or not (self.data_folder / f"{c}_seg.b2nd").is_file()]
        if missing:
            raise DiffAugError(f"{self.data_folder} lacks preprocessed file(s) for {len(missing)} training case(s) of "
                               f"fold {self.fold} ({', '.join(missing[:5])}): rerun nnUNetv2_plan_and_preprocess.")
        return cases

    def _label_lookup(self) -> np.ndarray:
        """Maps seg values (offset by 1 so -1 fits) to class indices; undeclared values -> 255."""
        top = max(self.label_values) + 2
        lut = np.full(top, 255, dtype=np.uint8)
        for i, v in enumerate(self.label_values):
            lut[v + 1] = i
        lut[OUTSIDE_LABEL + 1] = len(self.label_values)
        return lut

    # ------------------------------------------------------------------ classes
    @property
    def outside_class(self) -> int:
        return len(self.label_values)

    @property
    def num_classes(self) -> int:
        """Declared labels + "outside" + the context classes in use."""
        return len(self.label_values) + 1 + (self.context.model.num_classes if self.context else 0)

    def use_context(self, model) -> None:
        """Label maps carry the context classes of ``model`` (a context.ContextModel; None: none) from now on."""
        from nnunet_diffaug.synthesis.context import CACHE_FOLDER, ContextCache
        self.context = None if model is None else ContextCache(
            self.folder / CACHE_FOLDER / self.cm.data_identifier, model, self.outside_class)
        self._class_stats.clear()

    def _context_volume(self, case_id: str) -> np.ndarray:
        return self.context.volume(case_id, lambda: (np.asarray(self.case(case_id)[0][...], dtype=np.float32),
                                                     self.declared_label_volume(case_id)))

    def _with_context(self, labels: np.ndarray, case_id: str, region: tuple = (...,)) -> np.ndarray:
        if self.context is None:
            return labels
        from nnunet_diffaug.synthesis.context import merge
        return merge(labels, np.asarray(self._context_volume(case_id)[region]), self.outside_class)

    def encode_labels(self, seg: np.ndarray, case_id: str = "") -> np.ndarray:
        seg = np.asarray(seg).astype(np.int64) + 1
        if seg.min() < 0 or seg.max() >= len(self._lut) or np.any(self._lut[seg] == 255):
            raise DiffAugError(f"{self.data_folder / (case_id + '_seg.b2nd')}: holds label values that "
                               f"{self.folder / 'dataset.json'} does not declare.")
        return self._lut[seg]

    def case(self, case_id: str):
        """(data, seg, properties) of a case; data/seg are lazy blosc2 arrays of shape (C, *spatial)."""
        if case_id not in self._cases:
            from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
            if not hasattr(self, "_dataset"):
                self._dataset = nnUNetDatasetBlosc2(str(self.data_folder), identifiers=self.training_cases)
            data, seg, _, props = self._dataset.load_case(case_id)
            self._cases[case_id] = (data, seg, props)
        return self._cases[case_id]

    def volume_shape(self, case_id: str) -> tuple[int, ...]:
        return tuple(self.case(case_id)[0].shape[1:])

    def acquisition_spacing(self, case_id: str) -> list[float]:
        """The case's original spacing (mm, nnU-Net's axis order, before resampling): the spacing tag."""
        return [float(v) for v in self.case(case_id)[2]["spacing"]]

    def declared_label_volume(self, case_id: str) -> np.ndarray:
        """The class-index label volume of a case as nnU-Net preprocessed it: declared labels and 'outside' only."""
        return self.encode_labels(self.case(case_id)[1][0][...], case_id)

    def label_volume(self, case_id: str) -> np.ndarray:
        """The class-index label volume of a case (3D, transposed axes), context classes included when in use."""
        return self._with_context(self.declared_label_volume(case_id), case_id)

    def label_crop(self, case_id: str, region: tuple) -> np.ndarray:
        """Class indices of ``seg[0][region]`` (a crop of the volume), context classes included when in use."""
        seg = self.case(case_id)[1]
        return self._with_context(self.encode_labels(np.asarray(seg[(0, *region)]), case_id), case_id, region)

    def class_intensity_stats(self, case_id: str) -> np.ndarray:
        """(classes incl. 'outside' and context, C, 2): mean and sd of the normalised image over each class's voxels of the
        whole case (NaN rows: absent classes). Cached: training asks for the same cases again and again."""
        if case_id not in self._class_stats:
            from nnunet_diffaug.synthesis.class_stats import case_class_stats
            image = np.asarray(self.case(case_id)[0][...], dtype=np.float32)
            self._class_stats[case_id] = case_class_stats(image, self.label_volume(case_id), self.num_classes)
        return self._class_stats[case_id]

    # ------------------------------------------------------------------ intensity range
    def intensity_range(self, rng: np.random.Generator, n_samples: int = 32) -> tuple[list[float], list[float]]:
        """Per-channel [min, max] of the normalised training data (:func:`normalised_intensity_range`, estimated
        from up to ``n_samples`` whole cases); decoded images are clamped to it."""
        cases = list(self.training_cases)
        rng.shuffle(cases)
        return normalised_intensity_range(
            self.plans_manager, self.cm,
            lambda c: (np.asarray(self.case(case_id)[0][c][...]) for case_id in cases[:n_samples]))


def normalised_intensity_range(plans_manager, cm, channel_arrays) -> tuple[list[float], list[float]]:
    """Per-channel [min, max] of data in nnU-Net's normalised space. CT normalisation clips to known percentiles,
    so its range is exact; other schemes are estimated from the arrays ``channel_arrays(c)`` yields for channel
    ``c``, widened by 5%."""
    props = plans_manager.foreground_intensity_properties_per_channel
    lo, hi = [], []
    for c, scheme in enumerate(cm.normalization_schemes):
        p = props.get(str(c), props.get(c))
        if scheme == "CTNormalization" and p is not None:
            std = max(float(p["std"]), 1e-8)
            lo.append((float(p["percentile_00_5"]) - float(p["mean"])) / std)
            hi.append((float(p["percentile_99_5"]) - float(p["mean"])) / std)
            continue
        vmin, vmax = np.inf, -np.inf
        for arr in channel_arrays(c):
            vmin, vmax = min(vmin, float(arr.min())), max(vmax, float(arr.max()))
        margin = 0.05 * (vmax - vmin)
        lo.append(vmin - margin)
        hi.append(vmax + margin)
    return lo, hi


def fit_patch_size(requested: list[int], volume_shapes: list[tuple[int, ...]], divisor: int) -> list[int]:
    """The configured patch, capped at the largest volume, rounded up to a multiple of ``divisor``."""
    largest = np.max(np.array(volume_shapes), axis=0)
    return [int(-(-min(r, int(s)) // divisor) * divisor) for r, s in zip(requested, largest)]


def pad_to(array: np.ndarray, shape: list[int]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Mirror-pads the trailing spatial axes of ``array`` up to ``shape``; returns the padding used."""
    spatial = array.shape[-len(shape):]
    pads = [(0, 0)] * (array.ndim - len(shape))
    for s, t in zip(spatial, shape):
        before = max(t - s, 0) // 2
        pads.append((before, max(t - s, 0) - before))
    if any(p != (0, 0) for p in pads):
        # 'symmetric' works for any axis length >= 1 (also a single slice), unlike 'reflect'
        array = np.pad(array, pads, mode="symmetric")
    return array, pads[array.ndim - len(shape):]


class PatchSampler:
    """Random training crops (3D) or crops of slices (2D), half of them centred on labelled voxels.

    Deterministic given the numpy Generator, so a resumed run draws the same batches as an
    uninterrupted one (the trainer seeds one Generator per step).
    """

    def __init__(self, data: FoldData, patch_size: list[int], foreground_probability: float):
        self.data = data
        self.patch_size = list(patch_size)
        self.fg_prob = foreground_probability
        self.cases = data.training_cases
        self.shapes = {c: data.volume_shape(c) for c in self.cases}
        # 2D: weight cases by their number of slices so every slice is equally likely
        w = np.array([self.shapes[c][0] if data.spatial_dims == 2 else 1 for c in self.cases], dtype=float)
        self.case_p = w / w.sum()

    def _center(self, case_id: str, rng: np.random.Generator) -> list[int]:
        """A voxel to centre on: a random labelled voxel of a random present class, or uniform."""
        shape = self.shapes[case_id]
        if rng.random() < self.fg_prob:
            locs = self.data.case(case_id)[2].get("class_locations", {})
            present = [k for k in sorted(locs) if len(locs[k])]
            if present:
                pts = locs[present[rng.integers(len(present))]]
                return [int(v) for v in pts[rng.integers(len(pts))][1:]]
        return [int(rng.integers(s)) for s in shape]

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
        """One (image (C, *patch) float32, labels (1, *patch) uint8 class indices, case id) triple."""
        case_id = self.cases[rng.choice(len(self.cases), p=self.case_p)]
        data, seg, _ = self.data.case(case_id)
        shape = self.shapes[case_id]
        center = self._center(case_id, rng)
        if self.data.spatial_dims == 2:
            sl = center[0]
            center, shape = center[1:], shape[1:]
        slices = []
        for c, s, p in zip(center, shape, self.patch_size):
            start = int(np.clip(c - p // 2, 0, max(s - p, 0)))
            slices.append(slice(start, start + min(p, s)))
        region = (sl, *slices) if self.data.spatial_dims == 2 else tuple(slices)
        img = np.asarray(data[(slice(None), *region)])
        lab = self.data.label_crop(case_id, region)[None]
        img, _ = pad_to(img.astype(np.float32), self.patch_size)
        lab, _ = pad_to(lab, self.patch_size)
        return img, lab, case_id

    def batch_with_cases(self, rng: np.random.Generator, batch_size: int):
        """(images (B, C, *patch), labels (B, 1, *patch) int64, case ids) as torch tensors + a list."""
        import torch
        samples = [self.sample(rng) for _ in range(batch_size)]
        images = torch.from_numpy(np.stack([s[0] for s in samples]))
        labels = torch.from_numpy(np.stack([s[1] for s in samples]).astype(np.int64))
        return images, labels, [s[2] for s in samples]

    def batch(self, rng: np.random.Generator, batch_size: int):
        return self.batch_with_cases(rng, batch_size)[:2]
