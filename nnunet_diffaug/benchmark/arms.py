"""Benchmark arms as data: a name, a trainer, environment overrides, and the synthetic set it needs.

Built-in names (a compact grammar, so any ratio or schedule is an arm without code):

- ``stock``: nnU-Net's own trainer (``nnUNetTrainerBudget``: only the training length and seed set).
- ``stock_x<PPP>``: the same with PPP/100 times the iterations per epoch, e.g. ``stock_x150``: the
  equal-compute control of ``diffaug_r33_equalreal`` (which trains 1.5x the iterations at r = 1/3).
- ``diffaug_r<NN>[_auto|_linear|_cutoff<FF>][_equalreal][_generated]``: ``nnUNetTrainerDiffAug`` with
  synthetic share NN/100 (r33 and r67 mean 1/3 and 2/3) of diffusion-synthesized cases;
  the share is constant over the epochs unless ``_auto`` (the trainer's default: a cut-off with few real cases),
  ``_linear`` or ``_cutoff<FF>`` sets the schedule (a name always means the same schedule, whatever the
  trainer's default), ``_equalreal`` scales the
  iterations so the arm sees as many real samples as stock, ``_generated`` paints generated label
  maps instead of deformed real ones, ``_inpaint`` repaints a region around one structure of each real
  case (``--labels inpaint``; choose classes and edits in an arms file's synthetic ``options``), ``_judged`` keeps the n of 2n candidates that the fold's stock
  model (trained on the same real subset) segments best (``diffaug_synthesize --judge``), ``_painted`` trains on
  the cases as the synthesizer painted them (``--no-calibrate-intensity``; every other diffusion set has its
  classes calibrated to real intensities, ``diffaug_synthesize``'s default), ``_unlabeled`` trains the
  fold's synthesizer also on the pool's unlabelled remainder: the images of the cases that were not drawn as the
  fold's labelled cases, never the held-out test cases (``diffaug_train_synthesizer --unlabeled``);
  ``_context`` trains the fold's synthesizer with context classes where the labels say background (a body
  envelope split into :data:`CONTEXT_CLUSTERS` intensity clusters, the config's ``"context"`` block);
  ``_consistency`` trains the fold's synthesizer with the segmentation-consistency loss (the config's
  ``"consistency"`` block, :data:`CONSISTENCY`), whose judge is the fold's stock arm model (trained first, as for
  ``_judged``).
- ``deformed_real_r<NN>[...]``: the same mixing, with deformed copies of the real cases instead of
  synthesized ones (control: is the gain just from more geometric augmentation?).
- ``randomised_r<NN>[...]``: the same mixing, with images painted by randomised intensities on the
  real label maps (control: does the learned appearance matter, or does any new image do?).
  ``randomised_informed_r<NN>[...]`` draws each class's intensity around the real case's instead of from any
  contrast (``--class-prior real``).
- ``synthetic_only``: an alias of ``diffaug_r100`` (trained on synthetic cases only, validated on real).
- ``patchmix[_alpha<NN>]``: ``nnUNetTrainerDiffAugPatchMix`` on a ``real-aligned`` synthetic set.

Custom arms come from a JSON file: ``{"name": {"trainer": ..., "env": {...}, "synthetic":
{"generator": ..., "labels": ..., "options": {...}} or null}}``; a diffusion set is calibrated unless its
options hold ``"--no-calibrate-intensity": ""``.

Workspaces made before calibration was the default recorded their diffusion arms without it: such an arm
keeps that meaning in that workspace (see :func:`keep_recorded_meaning`), so adding seeds never mixes the two.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug import env_vars

STOCK_TRAINER = "nnUNetTrainerBudget"      # the stock trainer, only its training length and seed set
DIFFAUG_TRAINER = "nnUNetTrainerDiffAug"
PATCHMIX_TRAINER = "nnUNetTrainerDiffAugPatchMix"

GENERATORS = ("diffusion", "randomised", "deformed-real")
LABEL_MODES = ("real", "generated", "real-aligned", "inpaint")
# diffaug_synthesize flags an arms file may set for its synthetic set (the rest is the benchmark's to set alike)
SYNTHESIS_OPTIONS = ("--classes", "--host", "--edit", "--margin", "--scale-range", "--resample-jumps",
                     "--volume", "--guidance", "--intensity-jitter", "--randomisation", "--class-prior",
                     "--calibrate-intensity",
                     "--no-calibrate-intensity")
# A calibrated diffusion set carries this option; a set without it is as painted (the benchmark then passes
# --no-calibrate-intensity), which is what every diffusion set of earlier workspaces was.
CALIBRATE = ("--calibrate-intensity", "")
# Set by the benchmark for every arm alike (budget, seed, mirroring) or per fold (the synthetic set): an arm may
# not change them
RESERVED_ENV = (env_vars.NUM_EPOCHS, env_vars.ITERATIONS_PER_EPOCH, env_vars.VAL_ITERATIONS, env_vars.SEED,
                env_vars.SYNTHETIC_DATASET, env_vars.MIRRORING)
# The context of a _context arm's synthesizer (its config's "context" block); K = 3 inside the body: air (lungs,
# bowel gas), fat and soft tissue in CT
CONTEXT_CLUSTERS = 3
CONTEXT = {"body": True, "clusters": CONTEXT_CLUSTERS}
# The segmentation-consistency loss of a _consistency arm's synthesizer (its config's "consistency" block, the judge
# added per workspace: the stock arm's model folder); t <= 200 of 1000 as ControlNet++ (Li et al., ECCV 2024)
CONSISTENCY = {"weight": 1.0, "max_timestep": 200, "every": 1}
DEFAULT_ARMS = ("stock", "diffaug_r33_auto")   # the trainer's defaults: r = 1/3, schedule 'auto'
ALIASES = {"synthetic_only": "diffaug_r100"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MIXING = re.compile(r"^(?P<source>diffaug|deformed_real|randomised_informed|randomised)_r(?P<ratio>\d{1,3})"
                     r"(?:_(?P<schedule>auto|linear)|_cutoff(?P<cutoff>\d{1,3}))?(?P<equal>_equalreal)?(?:(?P<gen>_generated)|(?P<inpaint>_inpaint))?"
                     r"(?P<judged>_judged)?(?P<painted>_painted)?(?P<unlabeled>_unlabeled)?(?P<context>_context)?"
                     r"(?P<consistency>_consistency)?$")
_LONG_STOCK = re.compile(r"^stock_x(?P<percent>\d{3,4})$")
_PATCHMIX = re.compile(r"^patchmix(?:_alpha(?P<alpha>\d{1,3}))?$")
_SOURCE_GENERATOR = {"diffaug": "diffusion", "deformed_real": "deformed-real", "randomised": "randomised",
                     "randomised_informed": "randomised"}
INFORMED = ("--class-prior", "real")  # the option of a randomised_informed set

GRAMMAR_HELP = ("stock; stock_x<PPP> (PPP/100 times the iterations, e.g. stock_x150); diffaug_r<NN>, deformed_real_r<NN>, "
                "randomised_r<NN>, randomised_informed_r<NN> (NN = synthetic share in %, "
                "then optional _auto, _linear or _cutoff<FF> (else a constant share), _equalreal, "
                "_generated or _inpaint, _judged, _painted, _unlabeled, _context, _consistency), e.g. "
                "diffaug_r33, diffaug_r50_cutoff75_equalreal, deformed_real_r33; synthetic_only (= diffaug_r100); "
                "patchmix or patchmix_alpha<NN>; or a name defined in --arms-file")


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Which synthetic set an arm trains on; one set per fold and spec is made and shared by all arms."""
    generator: str = "diffusion"
    labels: str = "real"
    judge: bool = False                  # keep the half of 2n candidates the fold's stock arm reads best
    options: tuple = ()                  # sorted (flag, value) pairs passed to diffaug_synthesize, e.g. --classes
    unlabeled: bool = False              # the synthesizer also learns from the pool's unlabelled remainder
    context: bool = False                # the synthesizer conditions on context classes (CONTEXT)
    consistency: bool = False            # the synthesizer trains with the segmentation-consistency loss (CONSISTENCY)

    @property
    def calibrated(self) -> bool:
        return CALIBRATE in self.options

    def as_painted(self) -> "SyntheticSpec":
        """The same set with the cases as painted (no per-class intensity calibration)."""
        return dataclasses.replace(self, options=tuple(o for o in self.options if o != CALIBRATE))

    @property
    def needs_synthesizer(self) -> bool:
        # generated label maps come from the label generator trained with the diffusion synthesizer
        return self.generator == "diffusion" or self.labels == "generated"

    def to_json(self) -> dict:
        """Fields at their defaults are left out, so definitions recorded by earlier versions still compare equal."""
        out = {"generator": self.generator, "labels": self.labels}
        if self.judge:
            out["judge"] = True
        if self.options:
            out["options"] = dict(self.options)
        if self.unlabeled:
            out["unlabeled"] = True
        if self.context:
            out["context"] = dict(CONTEXT)
        if self.consistency:
            out["consistency"] = dict(CONSISTENCY)
        return out

    @property
    def key(self) -> str:
        key = f"{self.generator}__{self.labels}" + ("__judged" if self.judge else "")
        key += "".join(f"__{flag.strip('-')}={value}" for flag, value in self.options)
        return (key + ("__unlabeled" if self.unlabeled else "") + ("__context" if self.context else "")
                + ("__consistency" if self.consistency else ""))

    @property
    def synthesizer_variant(self) -> tuple[bool, bool, bool]:
        """Sets with the same variant share the fold's synthesizer."""
        return self.unlabeled, self.context, self.consistency


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    trainer: str
    env: tuple = ()                      # sorted (variable, value) pairs, values as strings
    synthetic: SyntheticSpec | None = None

    def as_painted(self) -> "Arm":
        return dataclasses.replace(self, synthetic=None if self.synthetic is None else self.synthetic.as_painted())

    def to_json(self) -> dict:
        return {"trainer": self.trainer, "env": dict(self.env),
                "synthetic": None if self.synthetic is None else self.synthetic.to_json()}


def _env(**values) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in values.items()))


def _ratio(nn: str) -> float:
    # the names round: r33 and r67 mean the thirds (r33 is the trainer's default 1/3, as in earlier workspaces)
    return {33: 1 / 3, 67: 2 / 3}.get(int(nn), int(nn) / 100)


def builtin_arm(name: str) -> Arm | None:
    """The arm a built-in name stands for, or None if the name is not in the grammar."""
    name = ALIASES.get(name, name)
    if name == "stock":
        return Arm("stock", STOCK_TRAINER)
    m = _LONG_STOCK.match(name)
    if m:
        percent = int(m["percent"])
        return Arm(name, STOCK_TRAINER, _env(**{env_vars.ITERATION_SCALE: percent / 100})) if percent >= 100 else None
    m = _MIXING.match(name)
    if m:
        ratio = _ratio(m["ratio"])
        if ratio > 1:
            return None
        env = {env_vars.SYNTHETIC_RATIO: ratio, env_vars.SYNTHETIC_SCHEDULE: m["schedule"] or "constant"}
        if m["cutoff"]:
            cutoff = int(m["cutoff"])
            if not 0 < cutoff <= 100:
                return None
            env[env_vars.SYNTHETIC_SCHEDULE] = f"cutoff:{cutoff / 100:g}"
        if m["equal"]:
            env[env_vars.EQUAL_REAL_EXPOSURE] = 1
        if (m["inpaint"] or m["painted"] or m["unlabeled"] or m["context"] or m["consistency"]) \
                and m["source"] != "diffaug":
            return None  # only the diffusion model repaints a region, has painted cases, learns from images or context
                         # and trains with a segmentation-consistency loss
        labels = "generated" if m["gen"] else "inpaint" if m["inpaint"] else "real"
        generator = _SOURCE_GENERATOR[m["source"]]
        options = (CALIBRATE,) if generator == "diffusion" and not m["painted"] else ()
        if m["source"] == "randomised_informed":
            options = (INFORMED,)
        spec = SyntheticSpec(generator, labels, bool(m["judged"]), options, bool(m["unlabeled"]), bool(m["context"]),
                             bool(m["consistency"]))
        return Arm(name, DIFFAUG_TRAINER, _env(**env), None if ratio == 0 else spec)
    m = _PATCHMIX.match(name)
    if m:
        env = {} if m["alpha"] is None else {env_vars.PATCHMIX_ALPHA: int(m["alpha"]) / 100}
        if m["alpha"] is not None and int(m["alpha"]) > 100:
            return None
        return Arm(name, PATCHMIX_TRAINER, _env(**env), SyntheticSpec("diffusion", "real-aligned", options=(CALIBRATE,)))
    return None


def ratio_arm_name(ratio: float) -> str:
    """The built-in name of a DiffAug arm at this synthetic share (for the --ratios flag)."""
    if not 0 < ratio <= 1:
        raise DiffAugError(f"--ratios: {ratio} is not in (0, 1].")
    return f"diffaug_r{round(100 * ratio):d}"


def load_arms_file(path: str | Path) -> dict[str, Arm]:
    """Custom arms from a JSON file, checked completely before any work starts."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DiffAugError(f"--arms-file {path} does not exist.") from None
    except json.JSONDecodeError as e:
        raise DiffAugError(f"--arms-file {path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict) or not obj:
        raise DiffAugError(f"--arms-file {path} must hold a JSON object: arm name -> {{trainer, env, synthetic}}.")
    return {name: _custom_arm(name, spec, path) for name, spec in obj.items()}


def _custom_arm(name: str, spec, path: Path) -> Arm:
    where = f"--arms-file {path}, arm {name!r}"
    if not _NAME.match(name):
        raise DiffAugError(f"{where}: a name may hold only letters, digits, '_', '.', '-' (it names a folder).")
    if builtin_arm(name) is not None or name in ALIASES:
        raise DiffAugError(f"{where}: the name is a built-in arm; choose another name for a custom arm.")
    if not isinstance(spec, dict):
        raise DiffAugError(f"{where}: must be an object with 'trainer', optional 'env' and 'synthetic'.")
    unknown = sorted(set(spec) - {"trainer", "env", "synthetic", "description"})
    if unknown:
        raise DiffAugError(f"{where}: unknown key(s) {unknown}; allowed: trainer, env, synthetic, description.")
    trainer = spec.get("trainer")
    if not isinstance(trainer, str) or not trainer:
        raise DiffAugError(f"{where}: 'trainer' must name an nnU-Net trainer class, e.g. {DIFFAUG_TRAINER!r}.")
    env = spec.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                            for v in env.values()):
        raise DiffAugError(f"{where}: 'env' must map variable names to strings or numbers.")
    reserved = sorted(set(env) & set(RESERVED_ENV))
    if reserved:
        raise DiffAugError(f"{where}: 'env' sets {reserved}, which the benchmark sets the same for every arm "
                           f"(budget, seed) or per fold (synthetic set); change the budget with the benchmark's flags.")
    synthetic = spec.get("synthetic")
    if synthetic is not None:
        if not isinstance(synthetic, dict) or set(synthetic) - {"generator", "labels", "options"}:
            raise DiffAugError(f"{where}: 'synthetic' must be null or {{\"generator\": ..., \"labels\": ..., "
                               f"\"options\": {{flag: value}}}}.")
        options = synthetic.get("options", {})
        if not isinstance(options, dict) or set(options) - set(SYNTHESIS_OPTIONS) or not all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in options.values()):
            raise DiffAugError(f"{where}: synthetic 'options' must map diffaug_synthesize flags among "
                               f"{list(SYNTHESIS_OPTIONS)} to strings or numbers.")
        generator = synthetic.get("generator", "diffusion")
        if generator not in GENERATORS:
            raise DiffAugError(f"{where}: synthetic generator {generator!r} is not one of {list(GENERATORS)}.")
        options = {k: str(v) for k, v in options.items()}
        if "--calibrate-intensity" in options and "--no-calibrate-intensity" in options:
            raise DiffAugError(f"{where}: synthetic 'options' hold both --calibrate-intensity and "
                               f"--no-calibrate-intensity; keep one.")
        if generator != "diffusion" and "--calibrate-intensity" in options:
            raise DiffAugError(f"{where}: --calibrate-intensity applies to the diffusion generator only, not "
                               f"{generator!r}.")
        # canonical form: calibrated diffusion sets carry CALIBRATE, as painted ones carry nothing
        painted = options.pop("--no-calibrate-intensity", None) is not None
        options.pop("--calibrate-intensity", None)
        if generator == "diffusion" and not painted:
            options[CALIBRATE[0]] = CALIBRATE[1]
        s = SyntheticSpec(generator, synthetic.get("labels", "real"), options=tuple(sorted(options.items())))
        if s.labels not in LABEL_MODES:
            raise DiffAugError(f"{where}: synthetic labels {s.labels!r} is not one of {list(LABEL_MODES)}.")
        synthetic = s
    return Arm(name, trainer, _env(**env), synthetic)


def resolve_arms(names, custom: dict[str, Arm] | None = None) -> list[Arm]:
    """The arms to run, stock first, each once (aliases folded); unknown names are refused with the valid ones."""
    custom = custom or {}
    arms: dict[str, Arm] = {}
    unknown = []
    for name in ["stock", *names]:
        arm = custom.get(name) or builtin_arm(name)
        if arm is None:
            unknown.append(name)
        elif arm.name not in arms:
            arms[arm.name] = arm
    if unknown:
        extra = f"; from the arms file: {', '.join(sorted(custom))}" if custom else ""
        raise DiffAugError(f"--arms: unknown arm(s) {unknown}. Valid: {GRAMMAR_HELP}{extra}.")
    return list(arms.values())
