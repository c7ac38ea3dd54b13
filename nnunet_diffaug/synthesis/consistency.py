"""Segmentation-consistency loss: train the painter to paint what the segmenter must learn.

A synthetic case hurts when its image does not show what its label map says. ControlNet++ (Li et al.,
"ControlNet++: Improving Conditional Controls with Efficient Consistency Feedback", ECCV 2024) adds a loss
between the condition and a frozen segmenter's reading of the one-step denoised image; GenSeg (Zhang et al.,
"Generative AI enables medical image segmentation in ultra low-data regimes", Nature Biomedical Engineering
2025) optimises the generator for the downstream segmenter. Here the segmenter is a stock nnU-Net trained on the
fold's real training cases (the "judge", :mod:`nnunet_diffaug.judge_filter`), checked with the same rules as
``diffaug_synthesize --judge`` plus: same plans and configuration as the synthesizer, so that both work in the
same preprocessed (normalised) space and the decoded image goes to the judge as it is.

Per training step (every ``every``-th), for the batch samples with ``t <= max_timestep`` that carry a label
map (unlabelled and label-dropped samples are on the "no label" condition and get none):

    x0 = one-step estimate from the model output (v, epsilon or rectified flow; image_generator.predicted_original)
    image = clamp(decoder(x0 / scale_factor))        (frozen autoencoder: gradients pass through it to x0)
    loss = nnU-Net's Dice + cross-entropy (DC_and_CE_loss, as nnUNetTrainer configures it) between the frozen
           judge's logits (eval mode, no deep supervision) and the conditioning label map in the judge's labels
           ('outside' and the context classes are background, as nnU-Net reads them)

With the diffusion stage's class balancing on (``class_balance_max_weight``), the cross-entropy weighs each
class as the diffusion loss does; nnU-Net's soft Dice already averages over classes, whatever their size.

The judge's identity (folder, checkpoint, sha256) is recorded in ``synthesizer.json`` and in the provenance of
every set the synthesizer makes; a resumed run with another judge is refused.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
import torch.nn.functional as F

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.file_io import file_sha256
from nnunet_diffaug.synthesis.config import SynthesizerConfig
from nnunet_diffaug.synthesis.data import DataSpec, FoldData
from nnunet_diffaug.synthesis.image_generator import predicted_original
from nnunet_diffaug.synthesis.sampling import autocast

RUN_KEY = "consistency"                   # its entry in synthesizer.json and in a synthetic set's provenance
JUDGE_CHECKPOINT = "checkpoint_final.pth"  # a finished judge: check_judge also needs its final validation


def open_judge(config: SynthesizerConfig, data: FoldData) -> dict | None:
    """Checks the config's judge against the fold (same dataset, labels, fold, real cases only: the rules of
    ``diffaug_synthesize --judge``) and the synthesizer's preprocessed space (same plans and configuration);
    returns its run entry for synthesizer.json, or None when the loss is off."""
    c = config.consistency
    if not c.enabled:
        return None
    from nnunet_diffaug.judge_filter import Judge, check_judge, check_judge_space, resolve_judge
    folder = resolve_judge(data.dataset_name, c.judge, "consistency.judge")
    judge = Judge(folder, JUDGE_CHECKPOINT, use_mirroring=False)
    where = f"consistency.judge {c.judge!r}"
    try:
        # the preprocessed dataset.json: the synthesizer trains without nnUNet_raw; same labels and file ending
        check_judge(judge, data.dataset_name, data.fold, data.dataset_json)
        check_judge_space(judge, data.plans_identifier, data.configuration, data.plans_manager)
    except DiffAugError as e:
        raise DiffAugError(f"{where}: {e}") from None
    checkpoint = folder / f"fold_{data.fold}" / JUDGE_CHECKPOINT
    return {"judge": str(folder), "checkpoint": str(checkpoint.relative_to(folder)),
            "judge_sha256": file_sha256(checkpoint), "weight": float(c.weight),
            "max_timestep": float(c.max_timestep), "every": int(c.every)}


def weak_judge_note(entry: dict, data: FoldData) -> str | None:
    """A warning when the judge does not read some class on its own validation cases (judge_filter)."""
    from nnunet_diffaug.judge_filter import Judge, blind_classes_note, judge_validation_dice
    judge = Judge(Path(entry["judge"]), JUDGE_CHECKPOINT)
    return blind_classes_note(judge, data.fold, judge_validation_dice(judge, data.fold, data.dataset_json),
                              "the consistency loss")


def check_same_judge(old: dict | None, new: dict | None, where: Path) -> None:
    """A run is continued with the judge it started with, or not at all."""
    if old and new and old.get("judge_sha256") != new.get("judge_sha256"):
        raise DiffAugError(f"{where}: this fold's synthesizer was started with the consistency judge {old['judge']} "
                           f"({old['checkpoint']}, sha256 {old['judge_sha256'][:16]}...), now it is {new['judge']} "
                           f"(sha256 {new['judge_sha256'][:16]}...): a run must keep the judge it was trained with. "
                           f"Restore that judge to continue, or pass --overwrite to start over.")


def judge_labels(spec: DataSpec) -> torch.Tensor:
    """Class index -> the judge's label value: declared labels keep their value; 'outside' and context classes
    (indices >= len(label_values)) are background, as nnU-Net reads them."""
    lut = torch.zeros(spec.num_classes, dtype=torch.long)
    lut[:len(spec.label_values)] = torch.as_tensor(spec.label_values, dtype=torch.long)
    return lut


class ConsistencyLoss:
    """The frozen judge and nnU-Net's loss, applied to the one-step estimates of selected samples."""

    def __init__(self, config: SynthesizerConfig, spec: DataSpec, entry: dict, autoencoder: torch.nn.Module,
                 scheduler, device: torch.device, class_weights: torch.Tensor | None = None):
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        from nnunet_diffaug.evaluation.nnunet_model import TrainedModel
        self.cfg, self.spec, self.device = config.consistency, spec, device
        self.mixed_precision = config.mixed_precision
        self.autoencoder, self.scheduler = autoencoder, scheduler
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates its trainer search
            model = TrainedModel(Path(entry["judge"]), spec.fold, Path(entry["checkpoint"]).name, "cpu",
                                 use_mirroring=False)
        net = model.predictor.network
        inner = getattr(net, "_orig_mod", net)
        if hasattr(getattr(inner, "decoder", None), "deep_supervision"):
            inner.decoder.deep_supervision = False  # built without it; kept off whatever the trainer class does
        self.network = net.to(device).eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        cm = model.predictor.configuration_manager
        strides = torch.as_tensor(cm.pool_op_kernel_sizes, dtype=torch.long)  # (stages, axes)
        self.divisor = [int(v) for v in strides.prod(dim=0)]
        self.lut = judge_labels(spec).to(device)
        num_heads = model.predictor.label_manager.num_segmentation_heads
        ce_kwargs = {}
        if class_weights is not None:  # the diffusion loss's class balancing, on the judge's output channels
            per_head = torch.ones(num_heads, dtype=torch.float32)
            for index, value in enumerate(spec.label_values):
                per_head[value] = float(class_weights[index])
            ce_kwargs["weight"] = per_head.to(device)
        # nnUNetTrainer._build_loss for non-region labels; ddp off: each process scores its own selected samples,
        # and they are not the same number in every process (nnU-Net's ddp batch Dice gathers across processes)
        self.loss = DC_and_CE_loss({"batch_dice": cm.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
                                   ce_kwargs, weight_ce=1, weight_dice=1, ignore_label=None,
                                   dice_class=MemoryEfficientSoftDiceLoss)
        self.lo = torch.as_tensor(spec.intensity_min, dtype=torch.float32, device=device)
        self.hi = torch.as_tensor(spec.intensity_max, dtype=torch.float32, device=device)

    def applies(self, step: int) -> bool:
        return step % self.cfg.every == 0

    def selected(self, timesteps: torch.Tensor, no_label: torch.Tensor | None) -> torch.Tensor:
        """(B,) booleans: samples at low enough noise that carry a label map."""
        chosen = timesteps.float() <= self.cfg.max_timestep
        if no_label is not None:
            chosen = chosen & ~no_label.to(chosen.device, torch.bool)
        return chosen

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images clamped to the training range (as Synthesizer.generate clamps)."""
        with autocast(self.device, self.mixed_precision):
            images = self.autoencoder.decode_stage_2_outputs(latents).float()
        shape = (1, -1) + (1,) * (images.ndim - 2)
        return torch.clamp(torch.nan_to_num(images, nan=0.0), self.lo.view(shape), self.hi.view(shape))

    def judge_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The judge's logits for images of any size: zero-padded (nnU-Net's inference padding) to a size its
        network takes (a multiple of its total stride per axis), cropped back."""
        spatial = images.shape[2:]
        target = [-(-s // d) * d for s, d in zip(spatial, self.divisor)]
        pads = []
        for s, t in reversed(list(zip(spatial, target))):  # F.pad: last axis first
            pads += [(t - s) // 2, t - s - (t - s) // 2]
        padded = F.pad(images, pads) if any(pads) else images
        with autocast(self.device, self.mixed_precision):
            logits = self.network(padded)
        if isinstance(logits, (list, tuple)):  # deep supervision: the full-resolution output comes first
            logits = logits[0]
        crop = tuple(slice((t - s) // 2, (t - s) // 2 + s) for s, t in zip(spatial, target))
        return logits[(slice(None), slice(None), *crop)].float()

    def __call__(self, noisy: torch.Tensor, model_output: torch.Tensor, timesteps: torch.Tensor,
                 labels: torch.Tensor, scale_factor: float, chosen: torch.Tensor) -> torch.Tensor:
        """nnU-Net's Dice + CE of the judge on the one-step estimates of the ``chosen`` samples (at least one)."""
        x0 = predicted_original(self.scheduler, noisy[chosen], model_output[chosen].float(), timesteps[chosen])
        images = self.decode(x0 / scale_factor)
        target = self.lut[labels[chosen].long()]
        return self.loss(self.judge_logits(images), target)
