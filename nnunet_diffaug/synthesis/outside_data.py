"""Information from outside the fold's labelled cases: unlabelled images (``--unlabeled``) and another
synthesizer's weights (``--init-from``). Both are checked against the fold's validation cases, named with
content hashes in the synthesizer's files, and carried into the provenance of every set it makes, so a set
made with them is never taken for a continuation of one made without.

Files in the synthesizer's folder:

    synthesizer.json       its run dict gains "unlabeled" (sources, counts, hashes) and "init_from" (folder,
                           weights hash, what it was trained on) when used; compared on resume
    unlabeled_images.json  every unlabelled image: source, files with their sha256, content hash
    seen_data.json         everything this synthesizer's weights have seen, its init source's included:
                           labelled cases per dataset, content hashes of unlabelled images, the label names;
                           what ``--init-from`` of a later run checks against that run's validation cases
    init_from_<stage>.json the tensors of each stage that were loaded from the init source, and those that
                           were not (re-initialised)

A synthetic set made by a synthesizer that saw more than its fold's labelled cases carries a copy of its seen data
(``diffaug_seen_data.json``, seen_beyond_fold), which the trainer checks against the split it trains with.

Starting from another synthesizer: every stage starts from its finished weights wherever a tensor's name and
shape match, and fine-tunes. When the label sets differ (other names or values), the tensors that read the
label map (SPADE's input convolutions, ControlNet's condition embedding input) and the whole label generator
are re-initialised. A source of another fold of the same dataset has seen this fold's validation cases (its
training cases include them) and is refused, as is one whose unlabelled images include them.

``--unlabeled-only`` trains a synthesizer from unlabelled images alone, checked against every labelled case of
the dataset (each is some fold's validation case): it has seen no labelled case, so every fold may start from
it; it writes to ``diffaug_synthesizer__<configuration>/unlabeled_only`` and cannot synthesize.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from torch import nn

from nnunet_diffaug import paths
from nnunet_diffaug import unlabeled as unl
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import atomic_write_json
from nnunet_diffaug.raw_dataset import list_cases, load_dataset_json, read_fold
from nnunet_diffaug.synthesis import checkpoint as ckpt
from nnunet_diffaug.synthesis.conditioning import condition_channels
from nnunet_diffaug.synthesis.config import ContextConfig, SynthesizerConfig
from nnunet_diffaug.synthesis.data import DataSpec, FoldData, fit_patch_size, normalised_intensity_range
from nnunet_diffaug.synthesis.ema import ema_weights
from nnunet_diffaug.synthesis.synthesizer import SPEC_FILE, STAGES, read_run_files

UNLABELED_FILE = "unlabeled_images.json"
SEEN_FILE = "seen_data.json"
# name fragments of the tensors that read the label map (re-initialised when the label set differs)
LABEL_INPUT_TENSORS = ("mlp_shared", "controlnet_cond_embedding.conv_in")
_STAGE_PREFIX = {"autoencoder": "autoencoder", "diffusion": "model", "label_autoencoder": "label_autoencoder",
                 "label_diffusion": "label_model"}


def seen_data(folder: Path) -> dict:
    """What a synthesizer's weights have seen (from seen_data.json; for older synthesizers, its own spec)."""
    folder = Path(folder)
    path = folder / SEEN_FILE
    if path.is_file():
        return json.loads(path.read_text())
    _, spec, _ = read_run_files(folder)
    return {"labelled_cases": {spec.dataset_name: list(spec.training_cases)}, "unlabeled_content_sha256": [],
            "labels": None}


def merge_seen(a: dict, b: dict) -> dict:
    cases = {k: sorted(set(v)) for k, v in a["labelled_cases"].items()}
    for k, v in b["labelled_cases"].items():
        cases[k] = sorted(set(cases.get(k, [])) | set(v))
    return {"labelled_cases": cases,
            "unlabeled_content_sha256": sorted(set(a["unlabeled_content_sha256"]) | set(b["unlabeled_content_sha256"])),
            "labels": a.get("labels")}


def seen_beyond_fold(folder: Path, dataset_name: str, training_cases: list[str], images: bool = True) -> dict | None:
    """What the synthesizer in ``folder`` has seen, when that is more than ``training_cases`` of ``dataset_name``
    (unlabelled images, an init source's labelled cases): a synthetic set it makes carries it, for the trainer to
    check against the validation cases of the split it trains with. None otherwise (and for synthesizers without
    seen_data.json, which saw their own cases only), so such sets keep their files. ``images`` False: the label
    generator's part (it never sees images)."""
    if not (Path(folder) / SEEN_FILE).is_file():
        return None
    seen = seen_data(folder)
    if not images:
        seen = {**seen, "unlabeled_content_sha256": []}
    own = set(training_cases)
    beyond = any(set(ids) - own if name == dataset_name else ids for name, ids in seen["labelled_cases"].items())
    return seen if beyond or seen["unlabeled_content_sha256"] else None


def _context_classes(context: ContextConfig) -> int:
    """How many context classes a config's context adds to the label maps (as context.ContextModel.num_classes)."""
    return context.clusters if context.clusters else int(context.body)


def _label_input_layout(config: SynthesizerConfig, num_classes: int, image_channels: int) -> tuple:
    """What the shapes of the tensors that read the condition map (LABEL_INPUT_TENSORS, the "no label" channel's
    weights among them) depend on: the conditioning, its input channels (with the "no label" one) and the width
    they feed."""
    d = config.diffusion
    channels = condition_channels(num_classes, d.edge_hint, d.tag_dim if d.tag_conditioning else 0,
                                  image_channels if d.class_intensity else 0, null_label=True)
    return d.conditioning, channels, (d.spade_hidden_channels if d.conditioning == "spade"
                                      else d.controlnet_embedding_channels[0])


def _null_input_trained(config: SynthesizerConfig, folder: Path) -> bool:
    """Whether a finished synthesizer's "no label" input was trained: by unlabelled images, by label dropout, or
    loaded from its own init source with the same label set. That last one is trusted, not followed down the chain
    (the source's source may be gone); since diffaug_train_synthesizer refuses a "no label" condition that nothing
    trains (check_no_label_condition), a synthesizer has it on only then, or where it was carried for its source's
    tensors to fit. ``folder``: the synthesizer's; its synthesizer.json says what trained it, its
    init_from_diffusion.json whether that input was loaded (a same label set with another condition layout
    re-initialises it)."""
    d = config.diffusion
    if not d.null_label:
        return False
    run = json.loads((Path(folder) / SPEC_FILE).read_text())
    if run.get("unlabeled") or run.get("unlabeled_only") or d.label_dropout > 0:
        return True
    return bool((run.get("init_from") or {}).get("same_labels")) and _label_inputs_loaded(folder)


def _label_inputs_loaded(folder: Path) -> bool:
    """Whether the tensors that read the condition map (the "no label" input among them) were all loaded from the
    init source, as the synthesizer's init_from_diffusion.json says (no such file: trusted)."""
    try:
        record = json.loads((Path(folder) / "init_from_diffusion.json").read_text())
    except (OSError, json.JSONDecodeError):
        return True
    return not any(frag in r.get("tensor", "") for r in record.get("not_loaded", []) for frag in LABEL_INPUT_TENSORS)


def guidance_refusal(folder: Path, config: SynthesizerConfig, guidance: float) -> str | None:
    """Why the finished synthesizer in ``folder`` must not sample with label guidance ``guidance`` (None: it may).
    Guidance other than 1 samples null + w x (conditional - null): without a trained "no label" input that
    extrapolates from a random branch. Its input is untrained where the channel was only carried for an init
    source's tensors to fit (another label set or condition layout)."""
    if float(guidance) == 1.0:
        return None
    if not config.diffusion.null_label:
        why = "was trained without the 'no label' condition (diffusion.null_label)"
    elif not _null_input_trained(config, folder):
        why = ("has the 'no label' input, but never trained it: no unlabelled images, no label dropout, and its "
               "--init-from source's trained input was not loaded (another label set or condition layout)")
    else:
        return None
    return (f"the synthesizer in {folder} {why}, so guided sampling (null + w x (conditional - null)) would "
            f"extrapolate from an untrained branch. Use label guidance 1 (plain conditional sampling), or retrain "
            f"the synthesizer with --unlabeled SOURCE or \"label_dropout\": 0.1 in the diffusion block of its config.")


@dataclasses.dataclass
class InitSource:
    """A finished synthesizer to start from."""
    folder: Path
    config: SynthesizerConfig
    dataset_name: str
    fold: int                          # -1: an --unlabeled-only synthesizer
    same_labels: bool
    weights_sha256: str
    seen: dict
    null_trained: bool = False         # its "no label" input was trained (_null_input_trained)
    label_input_layout: tuple = ()     # _label_input_layout of its tensors that read the condition map

    def null_input_not_loaded(self, config: SynthesizerConfig, data: FoldData) -> str | None:
        """Why this source gives a run with ``config`` no trained "no label" input (None: it does). Its input is
        part of the tensors that read the condition map: they are loaded only when the label set and their shapes
        agree (load_stage)."""
        if not self.config.diffusion.null_label:
            return f"{self.folder} was trained without the 'no label' condition"
        if not self.null_trained:
            return (f"{self.folder} has the 'no label' input, but never trained it (no unlabelled images, no "
                    f"label dropout)")
        if not self.same_labels:
            return (f"its label set differs from {data.dataset_name}'s, so the tensors that read the label map, the "
                    f"'no label' input among them, are re-initialised")
        ours = _label_input_layout(config, len(data.label_values) + 1 + _context_classes(config.context),
                                   data.in_channels)
        if ours != self.label_input_layout:
            return (f"this config reads the label map with another layout (conditioning, condition channels, "
                    f"width: {list(ours)}) than {self.folder} ({list(self.label_input_layout)}), so the tensors that "
                    f"read it, the 'no label' input among them, are re-initialised")
        return None

    def record(self) -> dict:
        return {"folder": str(self.folder), "weights_sha256": self.weights_sha256, "dataset": self.dataset_name,
                "fold": self.fold, "same_labels": self.same_labels}

    def load_stage(self, stage: str, module: nn.Module, out_folder: Path, log) -> None:
        """Copies every tensor of the source's ``stage`` whose name and shape match into ``module`` (the rest keep
        their fresh initialisation), and logs (and writes init_from_<stage>.json) which were loaded and which not."""
        if stage.startswith("label_") and not self.same_labels:
            log(f"init-from {stage}: re-initialised (the label set differs from {self.folder}'s)")
            return
        path = ckpt.final_file(self.folder, stage)
        if not path.is_file():
            log(f"init-from {stage}: {path} does not exist; {stage} starts from scratch")
            return
        tensors, _ = ckpt.load_checkpoint(path)
        source = ema_weights(tensors) if stage in ("diffusion", "label_diffusion") else None
        source = source if source is not None else ckpt.unprefixed(_STAGE_PREFIX[stage], tensors)
        own = module.state_dict()
        loaded, skipped = [], []
        merged = dict(own)
        for name, value in own.items():
            theirs = source.get(name)
            label_input = not self.same_labels and any(frag in name for frag in LABEL_INPUT_TENSORS)
            if theirs is None:
                skipped.append((name, "absent in the source"))
            elif tuple(theirs.shape) != tuple(value.shape):
                skipped.append((name, f"shape {list(theirs.shape)} in the source, {list(value.shape)} here"))
            elif label_input:
                skipped.append((name, "reads the label map, and the label set differs"))
            else:
                merged[name] = theirs.to(value.device, value.dtype)
                loaded.append(name)
        # a layer is loaded whole or not at all: a source bias beside a freshly initialised weight is neither
        not_loaded = {n for n, _ in skipped}
        for name in [n for n in loaded if n.endswith(".bias") and n[:-len("bias")] + "weight" in not_loaded]:
            merged[name] = own[name]
            loaded.remove(name)
            skipped.append((name, "its layer's weight was not loaded"))
        unused = sorted(set(source) - set(own))
        module.load_state_dict(merged)
        atomic_write_json(out_folder / f"init_from_{stage}.json",
                          {"source": str(path), "loaded": loaded,
                           "not_loaded": [{"tensor": n, "why": w} for n, w in skipped],
                           "unused_in_source": unused})
        log(f"init-from {stage}: loaded {len(loaded)} of {len(own)} tensors from {path}; not loaded "
            f"(re-initialised) {len(skipped)}" + (": " + "; ".join(f"{n} ({w})" for n, w in skipped) if skipped else "")
            + f"; loaded tensors listed in init_from_{stage}.json")


def open_init_source(folder: str, data: FoldData, out_folder: Path, validation: list[str],
                     unlabeled_only: bool = False) -> InitSource:
    """Checks a synthesizer folder to start from: finished, same channels and dimension, and blind to this fold's
    validation cases (``unlabeled_only``: to every labelled case of the dataset, given as ``validation``)."""
    src = Path(folder).resolve()
    if src == Path(out_folder).resolve():
        raise DiffAugError(f"--init-from {src} is this run's own folder; to continue a run, run the same command "
                           f"without --init-from.")
    if not src.is_dir():
        raise DiffAugError(f"--init-from {src}: no such folder (give a trained synthesizer's folder, e.g. "
                           f"$nnUNet_results/<dataset>/diffaug_synthesizer__<c>/fold_<f>).")
    config, spec, _ = read_run_files(src)
    missing = [str(ckpt.final_file(src, s)) for s in STAGES if not ckpt.final_file(src, s).is_file()]
    if missing:
        raise DiffAugError(f"--init-from {src}: the synthesizer has not finished ({', '.join(missing)} missing).")
    if spec.in_channels != data.in_channels:
        raise DiffAugError(f"--init-from {src}: it was trained on {spec.in_channels} channel(s), "
                           f"{data.dataset_name} has {data.in_channels}; a synthesizer can only start from one with "
                           f"the same channels.")
    if spec.spatial_dims != data.spatial_dims:  # no tensor of a 2D network fits a 3D one's (nor the reverse)
        raise DiffAugError(f"--init-from {src}: a {spec.spatial_dims}D synthesizer (configuration "
                           f"{spec.configuration!r}); this run's synthesizer ({out_folder}) is {data.spatial_dims}D "
                           f"(configuration {data.configuration!r}). A synthesizer can only start from one of the same "
                           f"dimension: give one trained on a {data.spatial_dims}D configuration.")
    # what the source must not have seen: with --unlabeled-only every labelled case of the dataset (no fold is used)
    cases, of = (("labelled case(s)", f"of {data.dataset_name}") if unlabeled_only
                 else ("validation case(s)", f"of fold {data.fold} of {data.dataset_name}"))
    seen = seen_data(src)

    def uncompared(name: str) -> None:
        against = "the dataset's labelled cases" if unlabeled_only else f"fold {data.fold}'s validation cases"
        print(f"NOTE: --init-from {src}: the labelled cases it saw of {name} could not be compared by content "
              f"with {against} ($nnUNet_raw/{name} is absent or unreadable here); only their names were checked.")
    leak = unl.seen_validation_leak(seen, data.dataset_name, validation, data.plans_manager.plans, cases, of,
                                    f"--init-from {src}", uncompared)
    if leak is not None:
        raise DiffAugError(f"--init-from {src}: its weights have seen {leak.text}{_init_advice(leak, unlabeled_only)}")
    our_labels = dict(data.dataset_json["labels"])
    if seen.get("labels") is not None:
        same = seen["labels"] == our_labels
    else:  # older synthesizers recorded no label names: the same dataset with the same values counts as same
        same = spec.dataset_name == data.dataset_name and list(spec.label_values) == list(data.label_values)
    return InitSource(src, config, spec.dataset_name, spec.fold, same, ckpt.weights_sha256(src, STAGES), seen,
                      _null_input_trained(config, src),
                      _label_input_layout(config, spec.num_classes, spec.in_channels))


def _init_advice(leak: unl.SeenLeak, unlabeled_only: bool) -> str:
    """What to do about an init source that has seen a protected case (the refusal's tail)."""
    if leak.kind == "labelled" and unlabeled_only:
        return (": an --unlabeled-only synthesizer must be blind to every labelled case of the dataset (each is some "
                "fold's validation case). Start from a synthesizer of another dataset, or from another "
                "--unlabeled-only one.")
    if leak.kind == "labelled":
        return (" (as labelled cases; a synthesizer of another fold trains on this fold's validation cases). Start "
                "from a synthesizer of another dataset or of this fold.")
    return ". Start from a synthesizer that never saw them."


def check_no_label_condition(requested: SynthesizerConfig, data: FoldData, trains: bool,
                             init: InitSource | None) -> None:
    """Refuses a config that asks for the "no label" condition (diffusion.null_label, or a sampling.label_guidance
    other than 1, which samples from it: null + w x (conditional - null)) when nothing trains it, before anything
    is written: its input would stay at its random initialisation and guidance would extrapolate from an untrained
    branch. ``requested``: the config as given (before gather turns null_label on); ``trains``: unlabelled images
    (--unlabeled, --unlabeled-only) are used.

    What trains it: unlabelled images, diffusion.label_dropout > 0, or an init source whose trained "no label" input
    is loaded. Loaded counts as trained: that input was learned on the source's null samples along with the rest of
    the network, and fine-tuning here starts from both (it may drift from the fine-tuned rest without null samples
    here; label_dropout keeps it in step). It is loaded only when the label set and the shapes of the tensors that
    read the condition map agree (InitSource.null_input_not_loaded); otherwise it starts fresh like any other.

    diffusion.null_label alone is not refused when the init source has the condition: gather adds the channel for
    the source's tensors to fit whatever the config says (and a run resumed with its folder's config.json, where
    gather wrote null_label true, must not be refused for it)."""
    d, guidance = requested.diffusion, float(requested.sampling.label_guidance)
    carried = init is not None and init.config.diffusion.null_label
    asked = [f"sampling.label_guidance is {guidance:g}"] if guidance != 1.0 else []
    if d.null_label and not carried:
        asked.insert(0, "diffusion.null_label is true")
    if not asked or trains or d.label_dropout > 0:
        return
    why = None if init is None else init.null_input_not_loaded(requested, data)
    if init is not None and why is None:
        return
    raise DiffAugError(
        f"config: {' and '.join(asked)}, but nothing trains the 'no label' condition"
        + (f" (--init-from {init.folder}: {why})" if why else "")
        + ": its input would stay untrained and guided sampling would extrapolate from an untrained branch. Add "
          "--unlabeled SOURCE (unlabelled images, trained on that condition), or \"label_dropout\": 0.1 in the "
          "diffusion block of the config (that share of labelled samples trains it)"
        + (", or set sampling.label_guidance to 1 (plain conditional sampling)" if guidance != 1.0 else "")
        + (", or leave diffusion.null_label out" if d.null_label and not carried else "") + ".")


@dataclasses.dataclass
class OutsideData:
    """What a training run takes from outside the fold's labelled cases (both parts optional)."""
    images: list = dataclasses.field(default_factory=list)       # unlabeled.PreprocessedImage, in order
    unlabeled_record: dict | None = None
    init: InitSource | None = None
    unlabeled_only: bool = False                                 # no labelled case at all (--unlabeled-only)

    def run_entries(self) -> dict:
        """The synthesizer.json entries (absent when unused, so other runs' files stay as they were)."""
        out = {}
        if self.unlabeled_record is not None:
            out["unlabeled"] = unl.summary(self.unlabeled_record)
        if self.init is not None:
            out["init_from"] = self.init.record()
        if self.unlabeled_only:
            out["unlabeled_only"] = True
        return out

    def seen(self, data: FoldData) -> dict:
        own = {"labelled_cases": {} if self.unlabeled_only else {data.dataset_name: list(data.training_cases)},
               "unlabeled_content_sha256": sorted({im.content_sha256 for im in self.images}),
               "labels": dict(data.dataset_json["labels"])}
        return own if self.init is None else merge_seen(own, self.init.seen)

    def write(self, folder: Path, data: FoldData) -> None:
        if self.unlabeled_record is not None:
            atomic_write_json(folder / UNLABELED_FILE, self.unlabeled_record)
        atomic_write_json(folder / SEEN_FILE, self.seen(data))


def gather(data: FoldData, config: SynthesizerConfig, out_folder: Path, sources: list[str] | None,
           init_from: str | None, log, progress: bool,
           unlabeled_only: bool = False) -> tuple[OutsideData, SynthesizerConfig]:
    """Checks and prepares the unlabelled images and the init source; returns them and the config to train with
    (the "no label" condition on with unlabelled images, or when the init source has it). Refuses a "no label"
    condition that nothing would train (check_no_label_condition), before any image is preprocessed.
    ``unlabeled_only``: the images are checked against every labelled case of the dataset, not only the fold's
    validation cases."""
    outside = OutsideData(unlabeled_only=unlabeled_only)
    requested = config
    if config.diffusion.label_dropout > 0 and not config.diffusion.null_label:  # dropped labels need the null channel
        config = dataclasses.replace(config, diffusion=dataclasses.replace(config.diffusion, null_label=True))
    validation: list[str] = []
    if (sources or init_from) and unlabeled_only:  # blind to every labelled case: each is some fold's validation case
        raw = paths.nnunet_raw() / data.dataset_name
        validation = sorted(list_cases(raw, load_dataset_json(raw))) if (raw / "dataset.json").is_file() else []
        if not validation:
            raise DiffAugError(f"{raw} does not exist: --unlabeled-only checks the images against every labelled "
                               f"case's raw image (set nnUNet_raw to the dataset's raw folder).")
    elif sources or init_from:
        validation = read_fold(data.folder, data.fold)[1]
    if init_from:
        outside.init = open_init_source(init_from, data, out_folder, validation, unlabeled_only)
    check_no_label_condition(requested, data, bool(sources) or unlabeled_only, outside.init)
    if sources:
        images = unl.find_unlabeled_images([str(s) for s in sources], data.dataset_json)
        unl.hash_and_check(images, data.dataset_name, data.plans_manager.plans, validation,
                           None if unlabeled_only else data.fold, progress)
        outside.unlabeled_record = unl.record(images)
        outside.images = unl.preprocess_unlabeled(images, data.dataset_name, data.plans_manager.plans,
                                                  data.plans_identifier, data.configuration, data.dataset_json,
                                                  log, progress)
    need_null = bool(sources) or (outside.init is not None and outside.init.config.diffusion.null_label)
    if need_null and not config.diffusion.null_label:
        config = dataclasses.replace(config, diffusion=dataclasses.replace(config.diffusion, null_label=True))
    return outside, config


def unlabeled_only_folder(dataset_name: str, configuration: str) -> Path:
    """Where ``--unlabeled-only`` trains: beside the folds' synthesizers, no fold's own."""
    return paths.synthesizer_folder(dataset_name, configuration, 0).parent / "unlabeled_only"


def unlabeled_only_spec(data: FoldData, config: SynthesizerConfig, images: list) -> DataSpec:
    """The DataSpec of a synthesizer without labelled cases: patch and intensity range from the unlabelled images
    (CT: the plans' clipping range, as for the folds)."""
    requested = config.data.patch_size_3d if data.spatial_dims == 3 else config.data.patch_size_2d
    shapes = [tuple(im.shape[2:]) if data.spatial_dims == 2 else tuple(im.shape[1:]) for im in images]
    lo, hi = normalised_intensity_range(data.plans_manager, data.cm,
                                        lambda c: (np.asarray(im.load()[c]) for im in images[:32]))
    return DataSpec(dataset_name=data.dataset_name, configuration=data.configuration,
                    plans_identifier=data.plans_identifier, fold=-1, training_cases=[],
                    spatial_dims=data.spatial_dims, in_channels=data.in_channels, label_values=data.label_values,
                    normalization_schemes=list(data.cm.normalization_schemes), intensity_min=lo, intensity_max=hi,
                    patch_size=fit_patch_size(list(requested), shapes, config.divisor()))


def provenance_entries(folder: Path) -> dict:
    """The provenance ``generator`` entries of a synthetic set made by the synthesizer in ``folder``: its
    unlabelled images, init source and segmentation-consistency judge (consistency.py), when it had any (absent
    otherwise, so older sets keep their provenance)."""
    try:
        run = json.loads((Path(folder) / "synthesizer.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: run[k] for k in ("unlabeled", "init_from", "consistency") if k in run}

