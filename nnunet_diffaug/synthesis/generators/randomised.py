"""``--generator randomised``: domain-randomised painting of label maps, no training.

After Billot et al., "SynthSeg: Segmentation of brain MRI scans of any contrast and resolution without
retraining" (Medical Image Analysis, 2023): every case gets a new random appearance, so a segmenter
trained on it cannot rely on any one contrast. Per case and channel, in nnU-Net's normalised units:

1. Gaussian mixture: each class (background and nnU-Net's 'outside' class included) draws a mean and
   a standard deviation; every voxel draws from its class's Gaussian. ``class_prior="uniform"`` (default)
   draws them uniformly from wide ranges: any contrast, SynthSeg's contrast-agnostic training.
   ``class_prior="real"`` draws them around a real training case's class statistics (the label map's
   source case), the data-informed priors SynthSeg's generator also offers when the target contrast is
   known: the contrast between classes stays (bright bone stays bright), bias, blur, noise and gamma
   still vary the texture, and each class is finally moved back to its drawn mean and sd (step 5).
2. Bias field: ``x * exp(m) + a`` with ``m``, ``a`` smooth random fields (Gaussian noise on a coarse
   grid, upsampled linearly).
3. Resolution loss: Gaussian blur, then (with some probability) down- and up-sampling by a random
   factor per axis.
4. Gaussian noise, then a random gamma on the clip range, then clipping to it (default: the fold's
   training intensity range per channel, the range the diffusion decoder is clamped to).
5. ``class_prior="real"`` only: per class, the affine moment matching of ``--calibrate-intensity``
   back to the drawn mean and sd, clipped again.

2D configurations never blur or resample across the first (slice) axis of a whole volume.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.synthesis.config import SamplingConfig
from nnunet_diffaug.synthesis.data import FoldData
from nnunet_diffaug.synthesis.generators.base import CaseDraw, Generator, SynthesisRequest

INTENSITY_RANGE_SEED = 0  # the clip range reads whole training cases; a fixed order keeps it reproducible
CLASS_PRIORS = ("uniform", "real")
PRIOR_FIELDS = ("class_prior", "prior_mean_shift", "prior_sd_scale")
# SynthSeg's strong gamma serves any-contrast training; around real intensities a mild one keeps the contrast
# (nnU-Net's own augmentation adds gamma 0.7-1.5 to a share of the samples anyway)
DEFAULT_GAMMA_LOG_SD = {"uniform": 0.4, "real": 0.1}


@dataclass(frozen=True)
class RandomisationRanges:
    """Where each random appearance parameter is drawn from (uniform in [low, high] unless said otherwise).

    Units are nnU-Net's normalised intensities (z-scores for CT and z-score schemes) and voxels.
    """
    mean: tuple[float, float] = (-2.0, 2.0)            # class mean
    sd: tuple[float, float] = (0.0, 0.5)               # class standard deviation
    bias_log_sd: float = 0.3                           # multiplicative field exp(m): sd of m on the coarse grid
    bias_additive_sd: float = 0.2                      # additive field a: its sd on the coarse grid
    bias_grid: int = 4                                 # coarse grid points per axis of both fields
    blur_sigma: tuple[float, float] = (0.0, 1.0)       # Gaussian blur, voxels, per axis
    downsample_probability: float = 0.5                # chance of down-up sampling
    downsample_factor: tuple[float, float] = (1.0, 3.0)  # per axis
    noise_sd: tuple[float, float] = (0.0, 0.15)        # additive Gaussian noise
    gamma_log_sd: float | None = None                  # gamma = exp(N(0, this)) on the clip range; None: 0.4, or
                                                       # 0.1 with the real prior (which keeps the real contrast)
    clip: tuple[float, float] | None = None            # None: the fold's training range, per channel
    class_prior: str = "uniform"                       # "uniform": `mean`, `sd` above; "real": around a real case's
    prior_mean_shift: float = 0.25                     # "real": sd of each class mean's Gaussian shift
    prior_sd_scale: tuple[float, float] = (0.5, 1.5)   # "real": factor on the real class sd

    def to_json(self) -> dict:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        out["gamma_log_sd"] = self.gamma_sd
        if self.class_prior == "uniform":  # sets recorded before the prior existed still compare equal
            for name in PRIOR_FIELDS:
                del out[name]
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> "RandomisationRanges":
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise DiffAugError(f"--randomisation {path}: no such file.") from None
        except (OSError, json.JSONDecodeError) as e:
            raise DiffAugError(f"--randomisation {path}: not a readable JSON file ({e}).") from None
        return cls.from_json(obj, f"--randomisation {path}")

    @classmethod
    def from_json(cls, obj, where: str = "randomisation ranges") -> "RandomisationRanges":
        """Any subset of the fields; missing ones keep their defaults. Unknown keys and bad values are refused."""
        if not isinstance(obj, dict):
            raise DiffAugError(f"{where}: must hold a JSON object of ranges, e.g. {{\"mean\": [-2, 2]}}.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - set(fields))
        if unknown:
            raise DiffAugError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}.")
        values = {}
        for name, value in obj.items():
            pair = isinstance(cls.__dataclass_fields__[name].default, tuple) or name == "clip"
            if name == "class_prior":
                pass  # a word, not a number: checked with the rest in _check
            elif pair and not (name == "clip" and value is None):
                if (not isinstance(value, list) or len(value) != 2
                        or not all(_is_number(v) for v in value) or value[0] > value[1]):
                    raise DiffAugError(f"{where}: {name!r} must be [low, high] with low <= high, not {value!r}.")
                value = (float(value[0]), float(value[1]))
            elif not pair and not _is_number(value):
                raise DiffAugError(f"{where}: {name!r} must be a number, not {value!r}.")
            values[name] = value
        ranges = cls(**values)
        ranges._check(where)
        return ranges

    @property
    def gamma_sd(self) -> float:
        if self.gamma_log_sd is not None:
            return self.gamma_log_sd
        return DEFAULT_GAMMA_LOG_SD[self.class_prior]

    def _check(self, where: str) -> None:
        problems = []
        for name in ("sd", "blur_sigma", "noise_sd"):
            if getattr(self, name)[0] < 0:
                problems.append(f"{name!r} must not be negative")
        if self.class_prior not in CLASS_PRIORS:
            problems.append(f"'class_prior' must be one of {list(CLASS_PRIORS)}")
        if self.prior_sd_scale[0] < 0:
            problems.append("'prior_sd_scale' must not be negative")
        for name in ("bias_log_sd", "bias_additive_sd", "gamma_log_sd", "prior_mean_shift"):
            if (getattr(self, name) or 0) < 0:
                problems.append(f"{name!r} must not be negative")
        if not 0 <= self.downsample_probability <= 1:
            problems.append("'downsample_probability' must lie in [0, 1]")
        if self.downsample_factor[0] < 1:
            problems.append("'downsample_factor' must be >= 1 (1 = no resolution loss)")
        if self.bias_grid < 2 or int(self.bias_grid) != self.bias_grid:
            problems.append("'bias_grid' must be an integer >= 2")
        if self.clip is not None and self.clip[0] >= self.clip[1]:
            problems.append("'clip' must be [low, high] with low < high")
        if problems:
            raise DiffAugError(f"{where}: {'; '.join(problems)}.")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _smooth_field(shape: tuple[int, ...], grid: int, sd: float, rng: np.random.Generator,
                  frozen_axes: int) -> np.ndarray:
    """Gaussian noise on a coarse grid, upsampled linearly to ``shape``: a smooth random field."""
    import torch
    import torch.nn.functional as F
    coarse = [1 if a < frozen_axes else min(int(grid), s) for a, s in enumerate(shape)]
    field = torch.from_numpy(rng.normal(0.0, sd, size=coarse).astype(np.float32))[None, None]
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(field, size=tuple(shape), mode=mode, align_corners=True)[0, 0].numpy()


def _lose_resolution(image: np.ndarray, factors: list[float]) -> np.ndarray:
    """Averages down by ``factors`` per axis and interpolates back: a coarser acquisition."""
    import torch
    import torch.nn.functional as F
    low = [max(1, int(round(s / f))) for s, f in zip(image.shape, factors)]
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    t = F.interpolate(t, size=tuple(low), mode="area")
    mode = "bilinear" if image.ndim == 2 else "trilinear"
    return F.interpolate(t, size=image.shape, mode=mode, align_corners=False)[0, 0].numpy()


def _class_gaussians(r: RandomisationRanges, num_classes: int, prior: np.ndarray | None,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One channel's class means and sds. ``prior`` (classes, 2): real mean and sd per class (NaN: unknown,
    drawn as with the uniform prior)."""
    means = rng.uniform(*r.mean, size=num_classes)
    sds = rng.uniform(*r.sd, size=num_classes)
    if r.class_prior == "real" and len(prior) < num_classes:  # context classes of generated maps: no real prior
        prior = np.concatenate([prior, np.full((num_classes - len(prior), 2), np.nan)])
    if r.class_prior == "real":
        known = np.isfinite(prior[:num_classes]).all(axis=1)
        shifted = prior[:num_classes, 0] + rng.normal(0.0, r.prior_mean_shift, size=num_classes)
        scaled = prior[:num_classes, 1] * rng.uniform(*r.prior_sd_scale, size=num_classes)
        means, sds = np.where(known, shifted, means), np.where(known, scaled, sds)
    return means, sds


def _pin_class_moments(x: np.ndarray, labels: np.ndarray, means: np.ndarray, sds: np.ndarray, lo: float,
                       hi: float) -> np.ndarray:
    """Moves every class back to its drawn mean (its spread toward its drawn sd): blur and resolution loss
    pull a thin bright class toward its neighbours, and bias and gamma shift it, so without this a rib
    painted at the real rib intensity ends up half as bright. The corruptions still shape the texture."""
    from nnunet_diffaug.synthesis.intensity_calibration import calibrate_class_intensity
    target = np.stack([means, sds], axis=-1)[:, None, :]
    pinned, _ = calibrate_class_intensity(x[None], labels, target, list(range(len(means))))
    return np.clip(pinned[0], lo, hi)


def paint_randomised(labels: np.ndarray, num_classes: int, clip: list[tuple[float, float]], ranges: RandomisationRanges,
                     rng: np.random.Generator, frozen_axes: int = 0,
                     prior: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Class indices (*spatial) -> (image (C, *spatial) float32, the parameters drawn per channel).

    ``clip``: (low, high) per channel. ``frozen_axes``: leading axes left unblurred and unresampled.
    ``prior``: (classes, C, 2) real class mean and sd per channel, needed by ``class_prior="real"``.
    """
    from scipy.ndimage import gaussian_filter
    r = ranges
    if r.class_prior == "real" and (prior is None or prior.shape[1] != len(clip)):
        raise ValueError("class_prior 'real' needs the real class statistics (classes, channels, 2) of every channel")
    channels, drawn = [], []
    for c, (lo, hi) in enumerate(clip):
        means, sds = _class_gaussians(r, num_classes, None if prior is None else prior[:, c], rng)
        x = means[labels] + sds[labels] * rng.standard_normal(labels.shape)
        x = x * np.exp(_smooth_field(labels.shape, r.bias_grid, r.bias_log_sd, rng, frozen_axes)) \
            + _smooth_field(labels.shape, r.bias_grid, r.bias_additive_sd, rng, frozen_axes)
        sigma = [0.0 if a < frozen_axes else float(rng.uniform(*r.blur_sigma)) for a in range(labels.ndim)]
        x = gaussian_filter(x, sigma, mode="nearest")
        factors = None
        if rng.random() < r.downsample_probability:
            factors = [1.0 if a < frozen_axes else float(rng.uniform(*r.downsample_factor)) for a in range(labels.ndim)]
            x = _lose_resolution(x, factors)
        noise = float(rng.uniform(*r.noise_sd))
        x = x + noise * rng.standard_normal(labels.shape)
        gamma = float(np.exp(rng.normal(0.0, r.gamma_sd)))
        unit = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
        x = lo + (hi - lo) * unit ** gamma
        if r.class_prior == "real":
            x = _pin_class_moments(x, labels, means, sds, lo, hi)
        channels.append(x.astype(np.float32))
        drawn.append({"class_means": np.round(means, 4).tolist(), "class_sds": np.round(sds, 4).tolist(),
                      "blur_sigma": [round(s, 4) for s in sigma],
                      "downsample_factors": None if factors is None else [round(f, 4) for f in factors],
                      "noise_sd": round(noise, 4), "gamma": round(gamma, 4)})
    return np.stack(channels), {"channels": drawn}


class RandomisedGenerator(Generator):
    kind = "randomised"
    label_modes = ("real", "real-aligned", "generated")
    options = ("--randomisation", "--class-prior")
    label_mode_reasons = {"inpaint": "repainting a region of a real case needs the trained diffusion model's "
                                     "latent sampler (--generator diffusion)"}

    def __init__(self, data: FoldData, ranges: RandomisationRanges, synthesizer_folder):
        self.data, self.ranges, self._syn_folder = data, ranges, synthesizer_folder
        self.sampling_config = SamplingConfig()  # label deformation as for the diffusion presets
        if ranges.clip is not None:
            self.clip = [tuple(ranges.clip)] * data.in_channels
        else:
            lo, hi = data.intensity_range(np.random.default_rng(INTENSITY_RANGE_SEED))
            self.clip = [(round(float(a), 4), round(float(b), 4)) for a, b in zip(lo, hi)]
        self.case_stats: dict[str, np.ndarray] = {}
        if ranges.class_prior == "real":
            self.case_stats = {c: data.class_intensity_stats(c) for c in data.training_cases}
            with warnings.catch_warnings():  # a class absent from every case stays NaN: drawn uniformly
                warnings.simplefilter("ignore", RuntimeWarning)
                self.fold_stats = np.nanmean(np.stack(list(self.case_stats.values())), axis=0)

    @classmethod
    def load_ranges(cls, request: SynthesisRequest) -> RandomisationRanges:
        path = request.options.get("--randomisation")
        ranges = RandomisationRanges() if path is None else RandomisationRanges.from_json_file(path)
        prior = request.options.get("--class-prior")
        if prior is not None:  # the flag wins over the file
            ranges = dataclasses.replace(ranges, class_prior=prior)
            ranges._check(f"--class-prior {prior!r}")
        return ranges

    @classmethod
    def check_request(cls, request: SynthesisRequest) -> None:
        super().check_request(request)
        cls.load_ranges(request)  # a bad file is refused before any data is read

    @classmethod
    def open(cls, request: SynthesisRequest) -> "RandomisedGenerator":
        from nnunet_diffaug import paths
        ranges = cls.load_ranges(request)
        data = FoldData(request.dataset_name, request.configuration, request.fold,
                        request.plans_identifier or "nnUNetPlans")
        return cls(data, ranges, paths.synthesizer_folder(request.dataset_name, request.configuration, request.fold))

    @property
    def synthesizer_folder(self):
        return self._syn_folder  # only its label generator is used (--labels generated)

    def generator_entry(self, labels: str) -> dict:
        return {"kind": "domain_randomised", "label_mode": labels, "plans_identifier": self.data.plans_identifier,
                "randomisation": self.ranges.to_json(), "intensity_clip": [list(c) for c in self.clip],
                "augmentation": {k: getattr(self.sampling_config, k)
                                 for k in ("rotate_degrees", "scale_range", "translate_fraction")}}

    def paint(self, draw: CaseDraw, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        # a whole volume of a 2D configuration: its slices are nnU-Net's samples, keep them apart
        frozen = 1 if draw.labels.ndim == 3 and self.data.spatial_dims == 2 else 0
        prior, record = None, {}
        if self.case_stats:
            # the label map's own case: its classes' contrast belongs to this anatomy; generated maps: any case
            case = draw.source if draw.source in self.case_stats else str(rng.choice(sorted(self.case_stats)))
            stats = self.case_stats[case]
            prior, record = np.where(np.isfinite(stats), stats, self.fold_stats), {"prior_case": case}
        image, drawn = paint_randomised(draw.labels, self.data.num_classes, self.clip, self.ranges, rng, frozen, prior)
        return image, {"randomisation": {**drawn, **record}}
