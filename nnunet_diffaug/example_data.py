"""Built-in example data: a real chest CT with its segmentation, shipped by the pip package ``slicerio``.

The CT (128 x 128 x 34 voxels, 3.05 x 3.05 x 10 mm) is cut into disjoint axial slabs; each slab is one
case, so no voxel appears in two cases. Slicer's eight segments are merged into five foreground
classes (the three vertebral segments become one 'spine'). Optionally the slabs are downsampled
in-plane, which keeps tests and the CPU demo fast.

Optionally only some classes stay labelled (``labels``): real datasets mostly label one to three structures,
while the five classes here label 43 % of the voxels, which hides problems that only unlabelled context shows.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import atomic_write_image, atomic_write_json

EXAMPLE_LABELS = {"background": 0, "ribs": 1, "spine": 2, "right_lung": 3, "left_lung": 4, "soft_tissue": 5}
# slicerio segment name -> our label value
_SEGMENT_TO_LABEL = {
    "ribs": 1,
    "cervical vertebral column": 2, "thoracic vertebral column": 2, "lumbar vertebral column": 2,
    "right lung": 3, "left lung": 4, "tissue": 5,
}


def _slicerio_files() -> tuple[Path, Path]:
    import slicerio
    data = Path(slicerio.__file__).resolve().parent / "data"
    ct, seg = data / "CTChest4.nrrd", data / "Segmentation.seg.nrrd"
    for f in (ct, seg):
        if not f.is_file():
            raise DiffAugError(f"{f} is missing: the installed slicerio package does not ship its sample data.")
    return ct, seg


def load_chest_ct():
    """Returns (ct_image, label_image) as SimpleITK images on the same grid, labels merged as EXAMPLE_LABELS."""
    import SimpleITK as sitk
    import slicerio
    ct_file, seg_file = _slicerio_files()
    ct = sitk.ReadImage(str(ct_file))
    seg = slicerio.read_segmentation(str(seg_file))
    if any(seg["referenceImageExtentOffset"]):
        raise DiffAugError(f"{seg_file}: segmentation extent is offset from the CT; cannot align.")
    voxels_xyz = seg["voxels"]  # (i, j, k) order
    merged = np.zeros_like(voxels_xyz, dtype=np.uint8)
    for segment in seg["segments"]:
        merged[voxels_xyz == segment["labelValue"]] = _SEGMENT_TO_LABEL[segment["name"]]
    label = sitk.GetImageFromArray(np.ascontiguousarray(merged.transpose(2, 1, 0)))
    label.CopyInformation(ct)
    return ct, label


def _resample_in_plane(image, size_xy: int, is_label: bool):
    import SimpleITK as sitk
    size = image.GetSize()
    spacing = image.GetSpacing()
    new_size = (size_xy, size_xy, size[2])
    new_spacing = (spacing[0] * size[0] / size_xy, spacing[1] * size[1] / size_xy, spacing[2])
    if not is_label and size_xy < size[0]:
        # anti-alias before downsampling, as a scanner with a coarser matrix would
        sigma = [0.5 * (ns - s) for ns, s in zip(new_spacing[:2], spacing[:2])] + [0.0]
        image = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), [max(s, 1e-3) for s in sigma])
    out = sitk.Resample(image, new_size, sitk.Transform(), sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear,
                        image.GetOrigin(), new_spacing, image.GetDirection(), 0 if is_label else -1024.0,
                        sitk.sitkUInt8 if is_label else sitk.sitkFloat32)
    if not is_label:
        out = sitk.Cast(sitk.Round(out), sitk.sitkInt16)
    return out


FOREGROUND_NAMES = tuple(name for name in EXAMPLE_LABELS if name != "background")


def select_labels(names: Sequence[str] | None) -> dict[str, int] | None:
    """The dataset.json labels that keep only ``names`` (in the given order, renumbered 1..k), or None for all
    (the dense example). Refuses an unknown, repeated or background name, naming the valid ones."""
    if names is None:
        return None
    names = list(names)
    valid = ", ".join(FOREGROUND_NAMES)
    if not names:
        raise DiffAugError(f"--labels needs at least one name; the example's labels are: {valid}.")
    for name in names:
        if name not in FOREGROUND_NAMES:
            what = "is always kept (every unlabelled voxel is background)" if name == "background" else \
                "is not a label of the example dataset"
            raise DiffAugError(f"--labels {' '.join(names)}: {name!r} {what}; valid names: {valid}.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DiffAugError(f"--labels {' '.join(names)}: {', '.join(repeated)} given twice; name each label once.")
    if tuple(names) == FOREGROUND_NAMES:
        return None  # every class in its own order: the dense example itself
    return {"background": 0, **{name: i for i, name in enumerate(names, start=1)}}


def sparse_task_name(names: Sequence[str], base: str = "ChestCTSlabs") -> str:
    """``ChestCTSlabs`` plus the kept names in CamelCase (spine, ribs -> ChestCTSlabsSpineRibs); ``base`` for all."""
    if select_labels(names) is None:
        return base
    return base + "".join(part.capitalize() for name in names for part in name.split("_"))


def _keep_only(label, kept: dict[str, int]):
    """The label image with only the kept classes, renumbered as ``kept``; every other voxel 0."""
    import SimpleITK as sitk
    lut = np.zeros(max(EXAMPLE_LABELS.values()) + 1, dtype=np.uint8)
    for name, value in kept.items():
        lut[EXAMPLE_LABELS[name]] = value
    out = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(label)])
    out.CopyInformation(label)
    return out


def build_example_dataset(raw_root: str | os.PathLike, dataset_id: int = 990, task_name: str | None = None,
                          slab_slices: int = 4, in_plane_size: int = 64, overwrite: bool = False,
                          labels: Sequence[str] | None = None) -> Path:
    """Writes the example as nnU-Net raw dataset ``Dataset{id}_{task_name}`` and returns its folder.

    ``slab_slices`` axial slices per case (34 // slab_slices cases); ``in_plane_size`` voxels per side.
    ``labels``: keep only these classes labelled (renumbered 1..k in the given order, every other voxel
    background; the images are unchanged); None keeps all. ``task_name`` defaults to ``ChestCTSlabs``, with the
    kept names appended when ``labels`` is given (``sparse_task_name``).
    """
    if slab_slices < 1 or 34 // slab_slices < 2:
        raise DiffAugError(f"slab_slices={slab_slices} gives fewer than 2 cases from the 34-slice CT.")
    kept = select_labels(labels)
    if task_name is None:
        task_name = "ChestCTSlabs" if kept is None else sparse_task_name(labels)
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{task_name}"
    others = sorted(p.name for p in Path(raw_root).glob(f"Dataset{dataset_id:03d}_*")
                    if p.is_dir() and p.name != folder.name)
    if others:
        raise DiffAugError(f"{Path(raw_root) / others[0]} already uses dataset id {dataset_id}; nnU-Net cannot tell "
                           f"two datasets with one id apart. Choose another -d for {folder.name}.")
    if (folder / "dataset.json").is_file() and not overwrite:
        return folder  # already built: building is deterministic, so reuse it
    ct, label = load_chest_ct()
    if in_plane_size != ct.GetSize()[0]:
        ct = _resample_in_plane(ct, in_plane_size, is_label=False)
        label = _resample_in_plane(label, in_plane_size, is_label=True)
    if kept is not None:
        label = _keep_only(label, kept)
    n_cases = ct.GetSize()[2] // slab_slices
    for i in range(n_cases):
        z0 = i * slab_slices
        case_id = f"chest_{i:03d}"
        # ITK slicing keeps physical placement, so slabs sit where they were in the patient
        atomic_write_image(ct[:, :, z0:z0 + slab_slices], folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        atomic_write_image(label[:, :, z0:z0 + slab_slices], folder / "labelsTr" / f"{case_id}.nii.gz")
    atomic_write_json(folder / "dataset.json", {
        "channel_names": {"0": "CT"},
        "labels": EXAMPLE_LABELS if kept is None else kept,
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "name": folder.name,
        "description": "Disjoint axial slabs of the chest CT shipped with slicerio (Slicer sample data), "
                       f"{slab_slices} slices per case, {in_plane_size}x{in_plane_size} in-plane."
                       + ("" if kept is None else f" Only {', '.join(list(kept)[1:])} labelled; every other voxel "
                          "is background."),
        "reference": "slicerio package data: CTChest4.nrrd and Segmentation.seg.nrrd",
    })
    return folder
