"""Unlabelled images for the synthesizer (``diffaug_train_synthesizer --unlabeled SOURCE ...``): finding them,
refusing the ones that must not be used, naming them by content hash, and preprocessing them with the real
dataset's plans.

A source is a folder of images named as nnU-Net's imagesTs (``CASE_0000<file_ending>``, one file per
channel), or another nnU-Net raw dataset (its imagesTr and imagesTs; labels are ignored). Refused, with the
file named: another file ending, a channel count other than the dataset's, unreadable or non-finite images,
and an image whose content equals one of the fold's validation cases (compared by a content hash of the
voxels and spacing as nnU-Net's reader returns them, so an exact voxel copy under another name or compression
is found too; a resampled or cropped copy is not).

Preprocessing is nnU-Net's own (``run_case_npy`` of the configuration's preprocessor, with the real plans),
as the synthetic cases get; the results are cached by content hash in
``nnUNet_preprocessed/<dataset>/diffaug_unlabeled/<plans>__<configuration>/<hash>.b2nd`` (blosc2, as nnU-Net
stores its own), never in the real
preprocessed folder, so a rerun (or another fold) preprocesses only new images. Lives at package level:
the synthesizer uses it, and the benchmark names its unlabelled images with it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from nnunet_diffaug import paths
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import atomic_path, atomic_write_json, file_sha256, read_json
from nnunet_diffaug.raw_dataset import list_cases, load_dataset_json, num_channels

CACHE_DIR = "diffaug_unlabeled"
HASHES_FILE = "content_hashes.json"
MARKER_SUFFIX = ".diffaug.json"
DATA_SUFFIX = ".b2nd"
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclasses.dataclass
class UnlabeledImage:
    """One unlabelled case: its files (one per channel) and, once read, its content hash."""
    case_id: str
    source: str                       # the source folder it was found in (absolute)
    files: list[str]                  # per channel, absolute
    content_sha256: str = ""          # voxels (float32) + shape + spacing, as nnU-Net's reader returns them
    file_sha256: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PreprocessedImage:
    """An unlabelled image in nnU-Net's preprocessed space: a float32 (C, *spatial) blosc2 file, compressed and
    chunked as nnU-Net stores its own preprocessed cases (crops read only the chunks they need)."""
    content_sha256: str
    path: str
    spacing: list[float]              # acquisition spacing (nnU-Net's reader order, as the real cases' pkl)
    shape: list[int]

    def load(self):
        """The lazily read array (slicing it returns numpy)."""
        import blosc2
        return blosc2.open(urlpath=self.path, mode="r", dparams={"nthreads": 1}, mmap_mode="r")


# ---------------------------------------------------------------------------------------------- finding images

def _image_folders(source: str, dataset_json: dict) -> list[Path]:
    """The folders of a source that hold its images; a raw dataset's channels and file ending must match."""
    path = Path(source)
    if not path.is_dir():
        try:  # a dataset name or id of nnUNet_raw
            path = paths.nnunet_raw() / paths.resolve_dataset_name(source)
        except DiffAugError:
            path = None
        if path is None or not path.is_dir():
            raise DiffAugError(f"--unlabeled {source}: no such folder (nor a dataset in $nnUNet_raw).")
    if not (path / "dataset.json").is_file():
        return [path.resolve()]
    other = load_dataset_json(path)
    where = path / "dataset.json"
    if other["file_ending"] != dataset_json["file_ending"]:
        raise DiffAugError(f"--unlabeled {where}: its images end in {other['file_ending']!r}, the dataset's in "
                           f"{dataset_json['file_ending']!r}.")
    if num_channels(other) != num_channels(dataset_json):
        raise DiffAugError(f"--unlabeled {where}: {num_channels(other)} channel(s) ({other['channel_names']}), the "
                           f"dataset has {num_channels(dataset_json)} ({dataset_json['channel_names']}).")
    folders = [(path / sub).resolve() for sub in ("imagesTr", "imagesTs") if (path / sub).is_dir()]
    if not folders:
        raise DiffAugError(f"--unlabeled {path}: an nnU-Net raw dataset without imagesTr or imagesTs.")
    return folders


def _images_of_folder(folder: Path, dataset_json: dict, source: str) -> list[UnlabeledImage]:
    ending, n = dataset_json["file_ending"], num_channels(dataset_json)
    channels: dict[str, dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        file = folder / name
        if file.is_dir():
            raise DiffAugError(f"--unlabeled: {file} is a folder; a source holds image files only "
                               f"(CASE_0000{ending}, one per channel).")
        if not name.endswith(ending):
            raise DiffAugError(f"--unlabeled: {file} does not end in {ending!r}, the dataset's file_ending; a "
                               f"source holds images named CASE_0000{ending}, one file per channel.")
        m = _CHANNEL_FILE.match(name[: -len(ending)])
        if m is None:
            raise DiffAugError(f"--unlabeled: {file} is not named CASE_XXXX{ending} (XXXX = the channel, 0000 "
                               f"for the first), as nnU-Net's images are.")
        channels.setdefault(m.group("case"), {})[int(m.group("channel"))] = str(file)
    images = []
    for case_id, found in channels.items():
        if sorted(found) != list(range(n)):
            raise DiffAugError(f"--unlabeled: case {case_id} of {folder} has channel(s) {sorted(found)} "
                               f"({', '.join(Path(f).name for f in found.values())}); the dataset has {n} "
                               f"({dataset_json['channel_names']}), files _0000 to _{n - 1:04d}.")
        images.append(UnlabeledImage(case_id, source, [found[c] for c in range(n)]))
    return images


def find_unlabeled_images(sources: list[str], dataset_json: dict) -> list[UnlabeledImage]:
    """Every unlabelled case of ``sources``, with checked names, endings and channel counts (not yet read)."""
    images: list[UnlabeledImage] = []
    for source in sources:
        found = []
        for folder in _image_folders(source, dataset_json):
            found += _images_of_folder(folder, dataset_json, str(Path(folder).resolve()))
        if not found:
            raise DiffAugError(f"--unlabeled {source}: holds no image ending in {dataset_json['file_ending']!r}.")
        images += found
    seen: dict[str, str] = {}
    for img in images:
        for f in img.files:
            if f in seen:
                raise DiffAugError(f"--unlabeled: {f} is given twice (sources overlap).")
            seen[f] = img.case_id
    return images


# ---------------------------------------------------------------------------------------------- reading, hashing

def _reader(plans: dict):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    return PlansManager(plans).image_reader_writer_class()


def read_image(files: list[str], reader) -> tuple[np.ndarray, dict]:
    """(C, *spatial) float32 and nnU-Net's properties, each file read on its own so a bad one is named."""
    arrays, props = [], None
    for f in files:
        try:
            data, p = reader.read_images([f])
        except Exception as e:  # the readers raise whatever their library raises
            text = str(e).strip().splitlines()
            raise DiffAugError(f"--unlabeled: {f} cannot be read as an image ({text[-1] if text else type(e).__name__})."
                               ) from None
        if data.shape[0] != 1:
            raise DiffAugError(f"--unlabeled: {f} holds {data.shape[0]} channels in one file; nnU-Net expects one "
                               f"file per channel (_0000, _0001, ...).")
        if props is not None and (data.shape[1:] != arrays[0].shape[1:]
                                  or not np.allclose(p["spacing"], props["spacing"], rtol=1e-3)):
            raise DiffAugError(f"--unlabeled: {f} differs in size or spacing from {files[0]} (same case).")
        if not np.isfinite(data).all():
            raise DiffAugError(f"--unlabeled: {f} holds NaN or Inf voxels.")
        arrays.append(np.asarray(data, dtype=np.float32))
        props = props or p
    return np.concatenate(arrays), props


def content_sha256(data: np.ndarray, spacing) -> str:
    """What an image IS, whatever its file is called or how it is compressed: voxels, shape and spacing."""
    h = hashlib.sha256()
    h.update(json.dumps([list(data.shape), [round(float(s), 4) for s in spacing]]).encode())
    h.update(np.ascontiguousarray(data, dtype=np.float32).tobytes())
    return h.hexdigest()


class _HashCache:
    """Content hashes of image files, reused while a file's size and mtime are unchanged (reading a large pool
    again on every rerun would cost minutes)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries = json.loads(path.read_text()) if path.is_file() else {}
        except (json.JSONDecodeError, OSError):
            self.entries = {}
        self.changed = False

    @staticmethod
    def _key(files: list[str]) -> str:
        return "|".join(files)

    @staticmethod
    def _stat(files: list[str]) -> list:
        return [[os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]

    def get(self, files: list[str]) -> dict | None:
        entry = self.entries.get(self._key(files))
        return entry if entry and entry.get("stat") == self._stat(files) else None

    def put(self, files: list[str], content: str, per_file: list[str]) -> None:
        self.entries[self._key(files)] = {"stat": self._stat(files), "content_sha256": content, "file_sha256": per_file}
        self.changed = True

    def save(self) -> None:
        if self.changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, self.entries)


def hash_images(files_per_case: list[list[str]], reader, cache: _HashCache,
                progress: bool = False) -> list[tuple[str, list[str]]]:
    """(content hash, per-file byte hashes) of each case; reads only cases the cache does not know."""
    from tqdm import tqdm
    out = []
    for files in tqdm(files_per_case, desc="Hashing images", disable=not progress, leave=False):
        entry = cache.get(files)
        if entry is None:
            data, props = read_image(files, reader)
            entry = {"content_sha256": content_sha256(data, props["spacing"]),
                     "file_sha256": [file_sha256(f) for f in files]}
            cache.put(files, entry["content_sha256"], entry["file_sha256"])
        out.append((entry["content_sha256"], list(entry["file_sha256"])))
    return out


def images_equal_to(candidates: dict[str, list[str]], protected: dict[str, list[str]], dataset_json: dict,
                    cache_file: Path) -> dict[str, str]:
    """candidate case -> protected case, for every candidate whose image content equals a protected one's (e.g. a
    benchmark's pool remainder against its test cases), read with nnU-Net's reader for ``dataset_json``."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    first = next(iter(protected.values()), None) or next(iter(candidates.values()), None)
    if first is None:
        return {}
    reader = determine_reader_writer_from_dataset_json(dataset_json, first[0], verbose=False)()
    cache = _HashCache(cache_file)
    try:
        prot = hash_images(list(protected.values()), reader, cache)
        cand = hash_images(list(candidates.values()), reader, cache)
    finally:
        cache.save()
    by_hash = {h: case for (h, _), case in zip(prot, protected)}
    return {case: by_hash[h] for (h, _), case in zip(cand, candidates) if h in by_hash}


def cache_root(dataset_name: str) -> Path:
    return paths.nnunet_preprocessed() / dataset_name / CACHE_DIR


def validation_hashes(dataset_name: str, validation_cases: list[str], plans: dict, why: str) -> dict[str, str]:
    """content hash -> validation case id, from the real dataset's raw images ($nnUNet_raw/<dataset>)."""
    if not validation_cases:
        return {}
    raw = paths.nnunet_raw() / dataset_name
    if not (raw / "dataset.json").is_file():
        raise DiffAugError(f"{raw} does not exist: the raw images of the fold's validation cases are needed to "
                           f"check that {why} holds none of them (set nnUNet_raw to the dataset's raw folder).")
    cases = list_cases(raw, load_dataset_json(raw))
    missing = [c for c in validation_cases if c not in cases]
    if missing:
        raise DiffAugError(f"{raw} lacks the raw images of validation case(s) {missing[:5]}: they are needed to "
                           f"check that {why} holds none of them.")
    cache = _HashCache(cache_root(dataset_name) / HASHES_FILE)
    hashes = hash_images([cases[c]["images"] for c in validation_cases], _reader(plans), cache)
    cache.save()
    return {h: c for (h, _), c in zip(hashes, validation_cases)}


def cases_equal_to(validation: dict[str, str], other_dataset: str, cases: list[str], plans: dict,
                   dataset_name: str) -> dict[str, str] | None:
    """case -> the validation case (``validation``: content hash -> case) whose content it equals, for labelled
    cases of ``other_dataset`` (what an --init-from source trained on); None when they cannot be compared (that
    dataset's raw images are not in $nnUNet_raw, or not readable as this dataset's)."""
    raw = paths.nnunet_raw() / other_dataset
    if not (raw / "dataset.json").is_file():
        return None
    if not validation:
        return {}
    known = list_cases(raw, load_dataset_json(raw))
    present = [c for c in cases if c in known]
    cache = _HashCache(cache_root(dataset_name) / HASHES_FILE)
    try:
        hashes = hash_images([known[c]["images"] for c in present], _reader(plans), cache)
    except DiffAugError:
        return None
    finally:
        cache.save()
    return {c: validation[h] for (h, _), c in zip(hashes, present) if h in validation}


@dataclasses.dataclass
class SeenLeak:
    """A protected case that a synthesizer's weights have seen (seen_validation_leak)."""
    kind: str   # "labelled": this dataset's case by name; "unlabelled": an unlabelled image's content;
    #             "copy": another dataset's labelled case with the same content
    text: str   # what was seen, to follow "has seen": "validation case(s) ['a'] of fold 0 of D ..."


def seen_validation_leak(seen: dict, dataset_name: str, protected: list[str], plans: dict | None, what: str,
                         of: str, why: str, uncompared) -> SeenLeak | None:
    """The first thing in ``seen`` (a synthesizer's seen data: labelled cases per dataset, content hashes of its
    unlabelled images) that is one of the ``protected`` cases of ``dataset_name`` (a fold's validation cases, or
    every labelled case), or None. The one comparison for an --init-from source and for the trainer's check of a
    synthetic set.

    This dataset's cases are compared by name; unlabelled images and other datasets' labelled cases (a copy of
    this dataset under another name) by content, reading the protected cases' raw images only when there is such
    a thing to compare. ``what``, ``of``: how the protected cases are named ("validation case(s)", "of fold 0 of
    D"); ``why``: what is checked, for the refusal of a missing raw image. ``uncompared(name)`` is called for
    another dataset whose cases cannot be compared by content here, and ``uncompared(None)`` when ``plans`` is
    None and something would have been (only names were then compared)."""
    leaked = sorted(set(seen["labelled_cases"].get(dataset_name, [])) & set(protected))
    if leaked:
        return SeenLeak("labelled", f"{what} {leaked[:5]} {of}")
    others = {name: ids for name, ids in seen["labelled_cases"].items() if name != dataset_name and ids}
    if not (seen["unlabeled_content_sha256"] or others):
        return None
    if plans is None:
        uncompared(None)
        return None
    val = validation_hashes(dataset_name, protected, plans, why)
    hit = sorted(val[h] for h in seen["unlabeled_content_sha256"] if h in val)
    if hit:
        return SeenLeak("unlabelled", f"{what} {hit[:5]} {of} among its unlabelled images (same content hash)")
    for name, cases in sorted(others.items()):
        equal = cases_equal_to(val, name, cases, plans, dataset_name)
        if equal:
            pairs = ", ".join(f"{c} = {v}" for c, v in sorted(equal.items())[:5])
            return SeenLeak("copy", f"labelled cases of {name} whose images are {what.replace('(s)', 's')} {of} "
                                    f"(same content hash: {pairs})")
        if equal is None:
            uncompared(name)
    return None


def hash_and_check(images: list[UnlabeledImage], dataset_name: str, plans: dict, validation_cases: list[str],
                   fold: int | None, progress: bool = False) -> None:
    """Fills in the content hashes of ``images`` (reading each once; refusing unreadable ones) and refuses any
    that is one of the fold's validation cases, naming the file and the case. ``fold`` None: the cases given are
    every labelled case of the dataset (``--unlabeled-only``), each of which is some fold's validation case."""
    val = validation_hashes(dataset_name, validation_cases, plans, "--unlabeled")
    cache = _HashCache(cache_root(dataset_name) / HASHES_FILE)
    try:
        hashes = hash_images([img.files for img in images], _reader(plans), cache, progress)
    finally:
        cache.save()
    for img, (content, per_file) in zip(images, hashes):
        img.content_sha256, img.file_sha256 = content, per_file
        if content in val and fold is None:
            raise DiffAugError(f"--unlabeled: {img.files[0]} is labelled case {val[content]} of {dataset_name} "
                               f"(same voxels and spacing): a synthesizer trained with --unlabeled-only serves every "
                               f"fold, and every labelled case is some fold's validation case. Remove it from the "
                               f"source.")
        if content in val:
            raise DiffAugError(f"--unlabeled: {img.files[0]} is validation case {val[content]} of fold {fold} "
                               f"of {dataset_name} (same voxels and spacing): the synthesizer must never see the "
                               f"fold's validation images. Remove it from the source.")


def record(images: list[UnlabeledImage]) -> dict:
    """Every unlabelled image (source, files, byte and content hashes), and one hash over all of them."""
    sources: dict[str, list[str]] = {}
    for img in images:
        sources.setdefault(img.source, []).append(img.content_sha256)
    entries = [{"case": img.case_id, "source": img.source, "content_sha256": img.content_sha256,
                "files": [{"path": f, "sha256": h} for f, h in zip(img.files, img.file_sha256)]} for img in images]
    return {"sha256": _hash_of(sorted(img.content_sha256 for img in images)),
            "sources": [{"path": s, "images": len(v), "sha256": _hash_of(sorted(v))} for s, v in sources.items()],
            "images": entries}


def summary(full_record: dict) -> dict:
    """The record without the per-image list: what the run file and a synthetic set's provenance carry."""
    return {k: v for k, v in full_record.items() if k != "images"} | {"images": len(full_record["images"])}


def _hash_of(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- preprocessing

def configuration_fingerprint(plans: dict, configuration_name: str) -> str:
    """Changes whenever preprocessing would give other output (the same rule as the synthetic cases' cache)."""
    relevant = {"configuration": plans["configurations"][configuration_name],
                "foreground_intensity_properties_per_channel": plans.get("foreground_intensity_properties_per_channel"),
                "transpose_forward": plans.get("transpose_forward")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def preprocessed_folder(dataset_name: str, plans_identifier: str, configuration: str) -> Path:
    return cache_root(dataset_name) / f"{plans_identifier}__{configuration}"


def preprocess_unlabeled(images: list[UnlabeledImage], dataset_name: str, plans: dict, plans_identifier: str,
                         configuration: str, dataset_json: dict, log=print,
                         progress: bool = False) -> list[PreprocessedImage]:
    """Brings the cache up to date for ``images`` (hashed first) and returns them preprocessed, in order.
    Only images without a current cache entry are preprocessed; each is written atomically, marker last."""
    import blosc2
    from tqdm import tqdm
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    folder = preprocessed_folder(dataset_name, plans_identifier, configuration)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = configuration_fingerprint(plans, configuration)
    out, todo = [], []
    for img in images:
        entry = _cached(folder, img.content_sha256, fingerprint)
        out.append(entry)
        if entry is None:
            todo.append(img)
    log(f"unlabeled: {len(images)} image(s), {len(images) - len(todo)} preprocessed earlier, {len(todo)} to "
        f"preprocess with the real plans ({folder})")
    if todo:
        pm = PlansManager(plans)
        cm = pm.get_configuration(configuration)
        preprocessor = cm.preprocessor_class(verbose=False)
        reader = pm.image_reader_writer_class()
        for img in tqdm(todo, desc="Preprocessing unlabelled images", disable=not progress):
            data, props = read_image(img.files, reader)
            if content_sha256(data, props["spacing"]) != img.content_sha256:
                raise DiffAugError(f"--unlabeled: {img.files[0]} changed while it was being read; run again.")
            spacing = [float(s) for s in props["spacing"]]
            data, _, _ = preprocessor.run_case_npy(data, None, props, pm, cm, dataset_json)
            data = np.ascontiguousarray(data, dtype=np.float32)
            stem = img.content_sha256[:32]
            blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
            with atomic_path(folder / f"{stem}{DATA_SUFFIX}") as tmp:
                blosc2.asarray(data, urlpath=str(tmp), chunks=chunks, blocks=blocks,
                               cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5, "nthreads": 1})
            atomic_write_json(folder / f"{stem}{MARKER_SUFFIX}",
                              {"configuration": fingerprint, "content_sha256": img.content_sha256,
                               "spacing": spacing, "shape": list(data.shape)})
        out = [entry or _cached(folder, img.content_sha256, fingerprint) for entry, img in zip(out, images)]
    return out


def _cached(folder: Path, content: str, fingerprint: str) -> PreprocessedImage | None:
    stem = content[:32]
    marker, npy = folder / f"{stem}{MARKER_SUFFIX}", folder / f"{stem}{DATA_SUFFIX}"
    if not marker.is_file() or not npy.is_file():
        return None
    try:
        m = read_json(marker)
    except DiffAugError:
        return None
    if m.get("configuration") != fingerprint or m.get("content_sha256") != content:
        return None
    return PreprocessedImage(content, str(npy), [float(s) for s in m["spacing"]], [int(s) for s in m["shape"]])
