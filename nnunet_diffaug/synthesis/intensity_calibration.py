"""Per-class intensity calibration of a painted case (``diffaug_synthesize --calibrate-intensity``).

Why: a synthesizer trained on a few cases paints small structures with the look of their
surroundings (on the built-in chest CT the tiny preset paints ribs near 0 HU where real ribs are
about 190 HU), because its autoencoder cannot reconstruct them and its diffusion loss barely sees
them. A segmenter trained on such cases learns that a label can sit on tissue that does not look
like it. Conditioning the model on class statistics does not fix what the autoencoder cannot decode.

What: after painting, every foreground class's voxels are mapped by one affine per class and channel,
``x -> target_mean + gain * (x - painted_mean)``, with ``gain = target_sd / painted_sd`` clipped to
``[1 / max_gain, max_gain]``, so the class's mean becomes the target's exactly and its spread moves
toward the target's while the painted texture (the spatial pattern inside the class) is kept. Targets
are a real case's statistics (the source case of the label map, else a random training case), i.e.
moment matching per class, the first-order version of histogram matching. Background and the
'outside' class are left as painted. For inpainted cases only voxels inside the repainted region move
(and only their statistics are used), so the real image outside stays bit for bit.
"""
from __future__ import annotations

import numpy as np

DEFAULT_MAX_GAIN = 2.0   # a class painted nearly flat is not blown up into noise
MIN_SD = 1e-6


def calibrate_class_intensity(image: np.ndarray, labels: np.ndarray, target: np.ndarray,
                              classes: list[int], within: np.ndarray | None = None,
                              max_gain: float = DEFAULT_MAX_GAIN) -> tuple[np.ndarray, dict]:
    """``image`` (C, *spatial) normalised, ``labels`` (*spatial) class indices, ``target`` (K, C, 2) mean/sd
    per class index (NaN rows: no target). Only ``classes`` (indices) are moved, only inside ``within``
    (boolean, *spatial) when given. Returns the calibrated image (float32) and a record per class."""
    out = np.array(image, dtype=np.float32, copy=True)
    region = np.ones(labels.shape, bool) if within is None else np.asarray(within, bool)
    record = {}
    for k in classes:
        voxels = (labels == k) & region
        if not voxels.any() or k >= len(target) or not np.isfinite(target[k]).all():
            continue
        entry = {"voxels": int(voxels.sum()), "painted_mean": [], "target_mean": [], "gain": []}
        for c in range(out.shape[0]):
            values = out[c][voxels].astype(np.float64)
            mean, sd = float(values.mean()), float(values.std())
            goal_mean, goal_sd = float(target[k, c, 0]), float(target[k, c, 1])
            gain = float(np.clip(goal_sd / sd, 1 / max_gain, max_gain)) if sd > MIN_SD else 1.0
            out[c][voxels] = (goal_mean + gain * (values - mean)).astype(np.float32)
            entry["painted_mean"].append(round(mean, 5))
            entry["target_mean"].append(round(goal_mean, 5))
            entry["gain"].append(round(gain, 4))
        record[str(k)] = entry
    return out, record
