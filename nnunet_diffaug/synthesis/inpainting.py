"""``--labels inpaint``: keep a real case, edit one structure of its label map, mark what to repaint.

Case ``i`` starts from training case ``i mod n`` (sorted ids; a case without a target structure, or
without the host class, passes to the next one), whole volume on its own grid, like ``real-aligned``.
One connected component of a target class (``--classes``, default every foreground class) is edited:

- ``keep``: left where it is; only its surroundings are repainted (a new appearance, same shape).
- ``move``: shifted so that its centre lands on a random voxel of the host region; of a few draws the
  one whose voxels land most inside the host is taken. Vacated voxels take the label of the nearest
  voxel that is neither vacated nor the structure (the tissue around it grows in).
- ``scale``: resized about its centre by a factor from ``--scale-range`` (in-plane only for 2D
  synthesizers, whose first axis is the slice axis); shrinking vacates voxels as for ``move``.
- ``paste``: a component of a target class from another training case, placed like ``move``; the
  case's own structures stay.

Host region: voxels of the ``--host`` class, or (default) every voxel of a non-target class inside the
nonzero mask. A moved, scaled or pasted structure is CLIPPED to the host region (plus, for ``move`` and
``scale``, the structure's own old voxels): voxels landing outside it are dropped and counted in the
record. If clipping leaves nothing (no draw overlaps the host), the case falls back to ``keep``, recorded.

Repaint region: the old and new structure dilated by ``--margin`` voxels. Outside it the written image
is the real case exactly; inside, the trained model paints the edited labels (RePaint, see
:func:`~nnunet_diffaug.synthesis.sampling.sample_latents_inpaint`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.synthesis.data import FoldData

EDITS = ("keep", "move", "scale", "paste")
DEFAULT_MARGIN = 4
DEFAULT_SCALE_RANGE = (0.6, 1.5)
PLACEMENT_DRAWS = 32        # random placements tried for move/paste; the one most inside the host wins
MIN_STRUCTURE_VOXELS = 5    # smaller components are picked only when a class has nothing larger


@dataclass
class InpaintSettings:
    classes: list[int]              # target class indices
    host: int | None                # host class index; None: any non-target class
    edits: list[str]                # one is drawn per case
    margin: int
    scale_range: tuple[float, float]
    class_names: dict[int, str]     # class index -> label name (records)

    def to_json(self) -> dict:
        return {"classes": [self.class_names[c] for c in self.classes],
                "host": None if self.host is None else self.class_names[self.host], "edits": list(self.edits),
                "margin": self.margin, "scale_range": list(self.scale_range), "clipped_to_host": True}


def _class_index(token: str, flag: str, names: dict[str, int], label_values: list[int]) -> int:
    token = token.strip()
    if token in names:
        value = names[token]
    else:
        try:
            value = int(token)
        except ValueError:
            value = None
        if value not in label_values:
            raise DiffAugError(f"{flag} {token!r}: no such label; the dataset's labels are "
                               f"{', '.join(f'{n}={v}' for n, v in names.items())}.")
    return label_values.index(value)


def parse_inpaint_settings(classes: str | None, host: str | None, edit: str | None, margin: int | None,
                           scale_range: str | None, dataset_json: dict, label_values: list[int]) -> InpaintSettings:
    """Checks the ``--labels inpaint`` flags against the dataset's labels; refuses bad ones by flag."""
    names = {k: int(v) for k, v in dataset_json["labels"].items() if k != "ignore"}
    value_name = {v: k for k, v in names.items()}
    class_names = {i: value_name.get(v, str(v)) for i, v in enumerate(label_values)}
    if classes is None:
        targets = list(range(1, len(label_values)))
    else:
        targets = sorted({_class_index(t, "--classes", names, label_values) for t in classes.split(",") if t.strip()})
        if not targets:
            raise DiffAugError(f"--classes {classes!r}: name at least one foreground class.")
        if 0 in targets:
            raise DiffAugError(f"--classes {classes!r}: the background ({class_names[0]}) cannot be a target.")
    host_index = None
    if host is not None:
        host_index = _class_index(host, "--host", names, label_values)
        if host_index in targets:
            raise DiffAugError(f"--host {host!r} is also a target class (--classes); the host must be another class.")
    edits = [e.strip() for e in (edit or "keep").split(",") if e.strip()]
    bad = [e for e in edits if e not in EDITS]
    if bad or not edits:
        raise DiffAugError(f"--edit {edit!r}: unknown edit(s) {bad}; choose from {', '.join(EDITS)} "
                           f"(a comma-separated list draws one per case).")
    margin = DEFAULT_MARGIN if margin is None else margin
    if int(margin) != margin or margin < 1:
        raise DiffAugError(f"--margin {margin}: give a whole number of voxels >= 1.")
    lo, hi = DEFAULT_SCALE_RANGE
    if scale_range is not None:
        try:
            lo, hi = (float(x) for x in scale_range.split(":"))
        except ValueError:
            raise DiffAugError(f"--scale-range {scale_range!r}: write LOW:HIGH, e.g. 0.6:1.5.") from None
        if not 0 < lo <= hi:
            raise DiffAugError(f"--scale-range {scale_range!r}: need 0 < LOW <= HIGH.")
    return InpaintSettings(targets, host_index, edits, int(margin), (lo, hi), class_names)


def _bbox(mask: np.ndarray) -> list[list[int]] | None:
    """[[start, stop), ...] per axis, or None for an empty mask."""
    if not mask.any():
        return None
    return [[int(s.start), int(s.stop)] for s in ndi.find_objects(mask.astype(np.uint8))[0]]


def _components(labels: np.ndarray, classes: list[int]) -> list[tuple[int, np.ndarray]]:
    """(class, boolean mask) of every connected component of the classes, small ones only if nothing else."""
    found = []
    for c in classes:
        comp, n = ndi.label(labels == c)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        keep = [k + 1 for k in np.flatnonzero(sizes >= MIN_STRUCTURE_VOXELS)] or [int(np.argmax(sizes)) + 1]
        found += [(c, comp == k) for k in keep]
    return found


def host_region(labels: np.ndarray, settings: InpaintSettings, outside_class: int) -> np.ndarray:
    if settings.host is not None:
        return labels == settings.host
    return ~np.isin(labels, settings.classes + [outside_class])


def _shift(mask: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """The mask translated by whole voxels; what leaves the volume is dropped."""
    out = np.zeros_like(mask)
    src = tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(offset, mask.shape))
    dst = tuple(slice(max(0, o), s - max(0, -o)) for o, s in zip(offset, mask.shape))
    out[dst] = mask[src]
    return out


def _place(structure: np.ndarray, host: np.ndarray, allowed: np.ndarray,
           rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The structure moved so its centre lands on a random ``host`` voxel (of a few draws, the one most
    inside ``allowed``), clipped to ``allowed``. Returns (placed mask, voxels clipped away)."""
    centre = np.rint(ndi.center_of_mass(structure)).astype(int)
    candidates = np.argwhere(host)
    if len(candidates) == 0:
        return np.zeros_like(structure), int(structure.sum())
    best, best_inside, size = None, -1, int(structure.sum())
    for k in rng.choice(len(candidates), size=min(PLACEMENT_DRAWS, len(candidates)), replace=False):
        moved = _shift(structure, candidates[k] - centre)
        inside = int((moved & allowed).sum())
        if inside > best_inside:
            best, best_inside = moved, inside
    return best & allowed, size - best_inside


def _scaled(structure: np.ndarray, factor: float, spatial_dims: int) -> np.ndarray:
    """The structure resized about its centre (nearest neighbour), on the same grid."""
    box = _bbox(structure)
    crop = structure[tuple(slice(a, b) for a, b in box)]
    zoom = [factor] * 3 if spatial_dims == 3 else [1.0, factor, factor]
    resized = ndi.zoom(crop.astype(np.uint8), zoom, order=0).astype(bool)
    out = np.zeros_like(structure)
    centre = [(a + b) / 2 for a, b in box]
    starts = [int(round(c - s / 2)) for c, s in zip(centre, resized.shape)]
    src = tuple(slice(max(0, -st), min(s, dim - st)) for st, s, dim in zip(starts, resized.shape, structure.shape))
    dst = tuple(slice(max(0, st), min(st + s, dim)) for st, s, dim in zip(starts, resized.shape, structure.shape))
    out[dst] = resized[src]
    return out


def _fill_vacated(labels: np.ndarray, vacated: np.ndarray, structure_class: int) -> np.ndarray:
    """A copy of ``labels`` whose vacated voxels take the label of the nearest voxel that is neither vacated
    nor of the structure's class."""
    donors = ~vacated & (labels != structure_class)
    if not vacated.any() or not donors.any():
        return labels.copy()
    _, nearest = ndi.distance_transform_edt(~donors, return_indices=True)
    out = labels.copy()
    out[vacated] = labels[tuple(idx[vacated] for idx in nearest)]
    return out


@dataclass
class Edit:
    labels: np.ndarray          # the edited class-index volume
    repaint: np.ndarray         # boolean: where the model repaints
    record: dict


class InpaintLabels:
    """Draws case ``i``'s edited label map and repaint region (``--labels inpaint``)."""

    def __init__(self, data: FoldData, settings: InpaintSettings, spatial_dims: int):
        self.data, self.settings, self.spatial_dims = data, settings, spatial_dims
        self.outside = len(data.label_values)
        usable = [c for c in data.training_cases if self._usable(data.label_volume(c))]
        if not usable:
            what = ", ".join(settings.class_names[c] for c in settings.classes)
            host = "" if settings.host is None else f" together with host class {settings.class_names[settings.host]}"
            raise DiffAugError(f"--classes/--host: no training case of fold {data.fold} holds a structure of "
                               f"{what}{host}; nothing to inpaint.")
        self.usable = usable

    def _usable(self, labels: np.ndarray) -> bool:
        has_target = bool(np.isin(labels, self.settings.classes).any())
        return has_target and (self.settings.host is None or bool((labels == self.settings.host).any()))

    def source_for(self, index: int) -> str:
        """Training case ``index mod n``, or the next one that holds a target structure (and the host)."""
        cases = self.data.training_cases
        for k in range(len(cases)):
            case_id = cases[(index + k) % len(cases)]
            if case_id in self.usable:
                return case_id
        raise AssertionError("unreachable: __init__ checked that a usable case exists")

    def edit(self, labels: np.ndarray, rng: np.random.Generator, source: str) -> Edit:
        s = self.settings
        edit = s.edits[int(rng.integers(len(s.edits)))]
        components = _components(labels, s.classes)
        cls, old = components[int(rng.integers(len(components)))]
        own_cls, own = cls, old
        record = {"edit": edit, "class": s.class_names[cls], "from_bbox": _bbox(old), "from_voxels": int(old.sum())}
        allowed = host_region(labels, s, self.outside)
        new, clipped, vacated = old, 0, np.zeros_like(old)
        if edit == "move":
            new, clipped = _place(old, allowed, allowed | old, rng)
            vacated = old & ~new
        elif edit == "scale":
            factor = float(rng.uniform(*s.scale_range))
            new = _scaled(old, factor, self.spatial_dims)
            clipped = int((new & ~(allowed | old)).sum())
            new &= allowed | old
            vacated = old & ~new
            record["scale"] = factor
        elif edit == "paste":
            donor_id = [c for c in self.usable if c != source] or [source]
            donor_id = donor_id[int(rng.integers(len(donor_id)))]
            donor_components = _components(self.data.label_volume(donor_id), s.classes)
            cls, structure = donor_components[int(rng.integers(len(donor_components)))]
            structure = _fit(structure, labels.shape)
            new, clipped = _place(structure, allowed, allowed, rng)
            record.update({"class": s.class_names[cls], "paste_source_case": donor_id,
                           "from_bbox": _bbox(structure), "from_voxels": int(structure.sum())})
            old = np.zeros_like(old)  # nothing of the case's own is moved
        if edit != "keep" and not new.any():
            record.update({"requested_edit": edit, "edit": "keep",
                           "note": "no placement overlapped the host region; kept in place"})
            record.update({"class": s.class_names[own_cls], "from_bbox": _bbox(own), "from_voxels": int(own.sum())})
            cls, new, old, clipped, vacated = own_cls, own, own, 0, np.zeros_like(own)
        edited = _fill_vacated(labels, vacated, cls)
        edited[new] = cls
        record.update({"to_bbox": _bbox(new), "to_voxels": int(new.sum()), "clipped_voxels": int(clipped)})
        return self._region(edited, old | new, labels, record)

    def _region(self, edited: np.ndarray, structures: np.ndarray, original: np.ndarray, record: dict) -> Edit:
        ball = ndi.generate_binary_structure(3, 1)
        repaint = ndi.binary_dilation(structures, ball, iterations=self.settings.margin)
        repaint |= edited != original  # vacated voxels always lie in it; this keeps it so whatever the margin
        record["repaint_bbox"] = _bbox(repaint)
        record["repaint_voxels"] = int(repaint.sum())
        record["changed_label_voxels"] = int((edited != original).sum())
        return Edit(edited, repaint, record)


def _fit(structure: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A donor case's structure on a grid of ``shape``: its bounding box copied to the corner (cropped if larger)."""
    box = _bbox(structure)
    crop = structure[tuple(slice(a, min(b, a + s)) for (a, b), s in zip(box, shape))]
    out = np.zeros(shape, bool)
    out[tuple(slice(0, s) for s in crop.shape)] = crop
    return out


def feather(repaint: np.ndarray, margin: int) -> np.ndarray:
    """Blend weight of the painted image: 0 outside the repaint region (the real image is kept exactly),
    rising smoothly (a Gaussian-blurred core, sigma = margin / 4) to ~1 about ``margin`` voxels inside its
    border, where the edited structure begins; so no seam shows."""
    sigma = max(margin / 4.0, 0.5)
    # the volume's own edge is no seam: it counts as inside (border_value, 'nearest')
    core = ndi.binary_erosion(repaint, iterations=int(np.ceil(2 * sigma)), border_value=1)
    weight = ndi.gaussian_filter((core if core.any() else repaint).astype(np.float32), sigma, mode="nearest")
    return np.where(repaint, np.clip(weight, 0.0, 1.0), 0.0).astype(np.float32)
