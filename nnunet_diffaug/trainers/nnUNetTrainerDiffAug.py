"""nnUNetTrainerDiffAug: nnU-Net's trainer with synthetic cases mixed into every training batch.

What changes against the stock ``nnUNetTrainer``:
- before training, the synthetic raw dataset made for this fold is located, checked (channels,
  labels, file ending, and that its synthesizer never saw a validation case of this fold) and
  preprocessed with this dataset's plans (incrementally, beside the real preprocessed data);
- each training batch holds ``round(r * batch_size)`` synthetic samples (stochastic rounding),
  shuffled among the real ones; the share actually drawn is written to the training log each epoch;
- validation, checkpoint selection and the final validation use real cases only (unchanged code).

The ratio r: class attribute ``synthetic_ratio`` (variants ``_r0`` ... ``_r100``), overridden by the
environment variable ``DIFFAUG_SYNTHETIC_RATIO``. r = 0 trains exactly like the stock trainer.
Its schedule over epochs (``schedule.py``): class attribute ``synthetic_schedule``, by default ``auto``
(a cut-off at 75 % of the epochs with at most 3 real training cases, a constant share with more; variants
``_constant``, ``_linear``, ``_cutoff50``, ``_cutoff75``), overridden by ``DIFFAUG_SYNTHETIC_SCHEDULE``.
Equal real exposure (``equal_real_exposure``, variant ``_equalreal``, ``DIFFAUG_EQUAL_REAL_EXPOSURE=1``)
scales each epoch's iterations by 1 / (1 - r_epoch), so the run sees as many real samples as the
stock trainer with the same budget. What was drawn goes to ``diffaug_training_stats.json``.
``DIFFAUG_MIRRORING=0`` turns nnU-Net's mirroring off (``mirroring.py``: for labels that name a side).
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunet_diffaug import paths
from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug import env_vars
from nnunet_diffaug.env_vars import env_flag, env_float
from nnunet_diffaug.trainers.budget import apply_budget_from_env
from nnunet_diffaug.trainers.mirroring import MirroringFromEnv
from nnunet_diffaug.trainers.mixing import MixedDataset, RatioDataLoader, is_synthetic_key
from nnunet_diffaug.trainers.patch_mix import (PairedDataset, PatchMixForward, aligned_variants,
                                               merge_patch_size)
from nnunet_diffaug.trainers.preprocess import preprocess_synthetic_cases
from nnunet_diffaug.trainers.schedule import (FEW_REAL_CASES, equal_exposure_iterations,
                                              parse_schedule)
from nnunet_diffaug.trainers.synthetic_source import (locate_synthetic_dataset, real_image_dimension,
                                                      validate_synthetic_dataset)
from nnunet_diffaug.trainers.training_stats import TrainingStats

__all__ = ["nnUNetTrainerBudget", "nnUNetTrainerDiffAug", "nnUNetTrainerDiffAug_r0", "nnUNetTrainerDiffAug_r10",
           "nnUNetTrainerDiffAug_r25", "nnUNetTrainerDiffAug_r50", "nnUNetTrainerDiffAug_r75",
           "nnUNetTrainerDiffAug_r100", "nnUNetTrainerDiffAugPatchMix", "nnUNetTrainerDiffAugPatchMix_alpha80",
           "nnUNetTrainerDiffAugPatchMix_alpha100", "nnUNetTrainerDiffAug_5epochs", "nnUNetTrainerDiffAug_linear",
           "nnUNetTrainerDiffAug_cutoff50", "nnUNetTrainerDiffAug_cutoff75", "nnUNetTrainerDiffAug_equalreal",
           "nnUNetTrainerDiffAug_constant"]

# Ruschke et al. (arXiv 2411.01351, 2024), the one method we build on that was evaluated inside
# nnU-Net, adds ~0.5 synthetic case per real case: a synthetic share of 1/3 of the training pool.
DEFAULT_SYNTHETIC_RATIO = 1 / 3


class nnUNetTrainerBudget(MirroringFromEnv, nnUNetTrainer):
    """The stock trainer, changed only in training length (``budget.py``) and, if asked, mirroring (``mirroring.py``):
    the control arm of benchmarks."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_budget_from_env(self)


class nnUNetTrainerDiffAug(MirroringFromEnv, nnUNetTrainer):
    synthetic_ratio: float = DEFAULT_SYNTHETIC_RATIO
    synthetic_schedule: str = "auto"
    equal_real_exposure: bool = False
    default_num_epochs: int | None = None   # a variant's training length; DIFFAUG_NUM_EPOCHS still wins

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.configuration_manager.previous_stage_name is not None or \
                self.configuration_manager.configuration.get("next_stage"):
            raise DiffAugError(f"nnUNetTrainerDiffAug does not support cascade configurations ({configuration}): "
                               f"synthetic cases have no previous-stage predictions. Use 2d or 3d_fullres.")
        self.synthetic_ratio = env_float(env_vars.SYNTHETIC_RATIO, type(self).synthetic_ratio, 0.0, 1.0)
        if os.environ.get(env_vars.SYNTHETIC_SCHEDULE):
            self.synthetic_schedule = parse_schedule(os.environ[env_vars.SYNTHETIC_SCHEDULE],
                                                     f"Environment variable {env_vars.SYNTHETIC_SCHEDULE}")
        else:
            self.synthetic_schedule = parse_schedule(type(self).synthetic_schedule,
                                                     f"{type(self).__name__}.synthetic_schedule")
        self.equal_real_exposure = env_flag(env_vars.EQUAL_REAL_EXPOSURE, type(self).equal_real_exposure)
        if type(self).default_num_epochs is not None:
            self.num_epochs = type(self).default_num_epochs
        apply_budget_from_env(self)  # once: DIFFAUG_ITERATION_SCALE multiplies, so a second call would square it
        self.synthetic_dataset_folder = None
        self.stock_iterations_per_epoch = None  # num_iterations_per_epoch before any equal-exposure scaling
        self._ratio_loader = None               # the RatioDataLoader whose shared ratio follows the schedule
        self._epoch_ratio = 0.0
        self._stats = None
        self._train_start_time = None
        self._samples_drawn = self._synthetic_drawn = 0

    def target_ratio(self, epoch: int) -> float:
        """The synthetic share the schedule asks for in ``epoch``."""
        return self.synthetic_schedule.ratio(self.synthetic_ratio, min(epoch, self.num_epochs - 1), self.num_epochs)

    # ------------------------------------------------------------------------------------------
    # data
    # ------------------------------------------------------------------------------------------
    def _prepare_synthetic_dataset(self, validation_cases: list[str]) -> nnUNetDatasetBlosc2:
        real_name = self.plans_manager.dataset_name
        folder = locate_synthetic_dataset(real_name, self.fold, self.configuration_name)
        validate_synthetic_dataset(folder, self.dataset_json, real_name, self.fold, self.configuration_name,
                                   validation_cases, is_3d=len(self.configuration_manager.patch_size) == 3,
                                   plans=self.plans_manager.plans)
        output = paths.synthetic_preprocessed_folder(real_name, folder.name, self.configuration_manager.data_identifier)
        if self.local_rank == 0:
            identifiers = preprocess_synthetic_cases(folder, self.dataset_json, self.plans_manager.plans,
                                                     self.configuration_name, output,
                                                     num_processes=max(1, get_allowed_n_proc_DA() // 2),
                                                     expected_dimension=real_image_dimension(real_name))
        if self.is_ddp:
            dist.barrier()
            if self.local_rank != 0:
                identifiers = preprocess_synthetic_cases(folder, self.dataset_json, self.plans_manager.plans,
                                                         self.configuration_name, output, verbose=False)
        self.synthetic_dataset_folder = folder
        self.print_to_log_file(f"DiffAug: {len(identifiers)} synthetic case(s) from {folder} "
                               f"(preprocessed in {output})")
        return nnUNetDatasetBlosc2(str(output), identifiers)

    def _resolve_schedule(self, real_training_cases: int):
        """Fixes an 'auto' schedule from the size of this fold's real training set (logged with the reason)."""
        resolved = self.synthetic_schedule.resolve(real_training_cases)
        if resolved != self.synthetic_schedule:
            self.print_to_log_file(f"DiffAug: schedule {self.synthetic_schedule} -> {resolved} "
                                   f"({real_training_cases} real training case(s); 'auto' cuts the synthetic "
                                   f"cases off at {FEW_REAL_CASES} or fewer)")
            self.synthetic_schedule = resolved

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        self._resolve_schedule(len(dataset_tr.identifiers))
        if self.synthetic_ratio > 0:
            synthetic = self._prepare_synthetic_dataset(list(dataset_val.identifiers))
            dataset_tr = MixedDataset(dataset_tr, synthetic)
            self.print_to_log_file(f"DiffAug: synthetic share per batch r = {self.synthetic_ratio:.3f}, "
                                   f"schedule {self.synthetic_schedule}")
        return dataset_tr, dataset_val

    def get_dataloaders(self):
        if self.synthetic_ratio == 0:
            return super().get_dataloaders()
        # Mirrors nnUNetTrainer.get_dataloaders (nnunetv2 2.8), with RatioDataLoader for training.
        if self.dataset_class is None:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        deep_supervision_scales = self._get_deep_supervision_scales()
        rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        label_kwargs = dict(foreground_labels=self.label_manager.foreground_labels,
                            regions=self.label_manager.foreground_regions if self.label_manager.has_regions else None,
                            ignore_label=self.label_manager.ignore_label)
        tr_transforms = self.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            **label_kwargs)
        val_transforms = self.get_validation_transforms(deep_supervision_scales, is_cascaded=self.is_cascaded,
                                                        **label_kwargs)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        common = dict(oversample_foreground_percent=self.oversample_foreground_percent, sampling_probabilities=None,
                      pad_sides=None, probabilistic_oversampling=self.probabilistic_oversampling)
        dl_tr = RatioDataLoader(dataset_tr, self.batch_size, initial_patch_size, patch_size, self.label_manager,
                                transforms=tr_transforms, synthetic_ratio=self.target_ratio(self.current_epoch),
                                **common)
        self._ratio_loader = dl_tr
        dl_val = nnUNetDataLoader(dataset_val, self.batch_size, patch_size, patch_size, self.label_manager,
                                  transforms=val_transforms, **common)
        allowed_num_processes = get_allowed_n_proc_DA()
        if allowed_num_processes == 0:
            mt_gen_train, mt_gen_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == 'cuda'
            mt_gen_train = NonDetMultiThreadedAugmenter(
                data_loader=dl_tr, transform=None, num_processes=allowed_num_processes,
                num_cached=max(6, allowed_num_processes // 2), seeds=None, pin_memory=pin, wait_time=0.002)
            mt_gen_val = NonDetMultiThreadedAugmenter(
                data_loader=dl_val, transform=None, num_processes=max(1, allowed_num_processes // 2),
                num_cached=max(3, allowed_num_processes // 4), seeds=None, pin_memory=pin, wait_time=0.002)
        _ = next(mt_gen_train)
        _ = next(mt_gen_val)
        return mt_gen_train, mt_gen_val

    # ------------------------------------------------------------------------------------------
    # schedule, equal real exposure, and what was actually drawn
    # ------------------------------------------------------------------------------------------
    def on_train_start(self):
        if self.equal_real_exposure:  # refuses r = 1 before any data are prepared
            equal_exposure_iterations(self.num_iterations_per_epoch, self.synthetic_ratio)
        self.stock_iterations_per_epoch = self.num_iterations_per_epoch
        self._train_start_time = time.time()
        super().on_train_start()
        self._stats = TrainingStats(type(self).__name__, str(self.synthetic_schedule), self.synthetic_ratio,
                                    self.equal_real_exposure, self.num_epochs, self.stock_iterations_per_epoch,
                                    self.configuration_manager.batch_size)
        self._stats.resume_from(self.output_folder, self.current_epoch)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._epoch_ratio = self.target_ratio(self.current_epoch)
        if self._ratio_loader is not None:
            # workers read it per batch; batches they prefetched at the old share still arrive first
            self._ratio_loader.synthetic_ratio = self._epoch_ratio
        # nnU-Net's run_training reads num_iterations_per_epoch after this hook, every epoch
        self.num_iterations_per_epoch = (equal_exposure_iterations(self.stock_iterations_per_epoch, self._epoch_ratio)
                                         if self.equal_real_exposure else self.stock_iterations_per_epoch)
        exposure = (f" (stock {self.stock_iterations_per_epoch}, equal real exposure)"
                    if self.equal_real_exposure else "")
        self.print_to_log_file(f"DiffAug: target synthetic share r = {self._epoch_ratio:.3f} (schedule "
                               f"{self.synthetic_schedule}, base r = {self.synthetic_ratio:.3f}), "
                               f"{self.num_iterations_per_epoch} training iterations{exposure}")
        self._samples_drawn = self._synthetic_drawn = 0

    def train_step(self, batch: dict) -> dict:
        keys = batch.get('keys', [])
        self._samples_drawn += len(keys)
        self._synthetic_drawn += sum(is_synthetic_key(k) for k in keys)
        return super().train_step(batch)

    def _drawn_counts(self) -> tuple[int, int]:
        """(synthetic, all) samples drawn this epoch, over all DDP ranks."""
        if not self.is_ddp:
            return self._synthetic_drawn, self._samples_drawn
        counts = torch.tensor([self._synthetic_drawn, self._samples_drawn], dtype=torch.long, device=self.device)
        dist.all_reduce(counts)
        return int(counts[0]), int(counts[1])

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        synthetic, samples = self._drawn_counts()
        if samples:
            self.print_to_log_file(f"DiffAug: synthetic share drawn this epoch: {synthetic / samples:.3f} "
                                   f"({synthetic}/{samples} samples, target r = {self._epoch_ratio:.3f}, "
                                   f"schedule {self.synthetic_schedule})")
        self._stats.record_epoch(round(self._epoch_ratio, 6), self.num_iterations_per_epoch, synthetic,
                                 samples - synthetic)
        if self.local_rank == 0:
            self._stats.write(self.output_folder, time.time() - self._train_start_time, complete=False)
        self._samples_drawn = self._synthetic_drawn = 0

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0:
            summary = self._stats.write(self.output_folder, time.time() - self._train_start_time, complete=True)
            self.print_to_log_file(
                f"DiffAug: {summary['total_iterations']} training iterations (stock budget "
                f"{summary['stock_total_iterations']}, x{summary['iterations_vs_stock']:.3f}); "
                f"{summary['real_samples']} real samples (stock {summary['stock_real_samples']}), "
                f"{summary['synthetic_samples']} synthetic samples")


# ---- ratio variants (nnU-Net style: pick with -tr) ------------------------------------------------

class nnUNetTrainerDiffAug_r0(nnUNetTrainerDiffAug):
    synthetic_ratio = 0.0


class nnUNetTrainerDiffAug_r10(nnUNetTrainerDiffAug):
    synthetic_ratio = 0.10


class nnUNetTrainerDiffAug_r25(nnUNetTrainerDiffAug):
    synthetic_ratio = 0.25


class nnUNetTrainerDiffAug_r50(nnUNetTrainerDiffAug):
    synthetic_ratio = 0.50


class nnUNetTrainerDiffAug_r75(nnUNetTrainerDiffAug):
    synthetic_ratio = 0.75


class nnUNetTrainerDiffAug_r100(nnUNetTrainerDiffAug):
    """Synthetic-only training (the 'synthetic' arm of Ruschke et al., arXiv 2411.01351, 2024); validation
    stays real."""
    synthetic_ratio = 1.0


# ---- schedules of the synthetic share, equal real exposure -------------------------------------

class nnUNetTrainerDiffAug_constant(nnUNetTrainerDiffAug):
    """The share r in every epoch, whatever the number of real training cases (the default before 'auto')."""
    synthetic_schedule = "constant"


class nnUNetTrainerDiffAug_linear(nnUNetTrainerDiffAug):
    """r at the first epoch, decaying linearly to 0 at the last."""
    synthetic_schedule = "linear"


class nnUNetTrainerDiffAug_cutoff50(nnUNetTrainerDiffAug):
    """Mix for the first half of the epochs, then real data only."""
    synthetic_schedule = "cutoff:0.5"


class nnUNetTrainerDiffAug_cutoff75(nnUNetTrainerDiffAug):
    synthetic_schedule = "cutoff:0.75"


class nnUNetTrainerDiffAug_equalreal(nnUNetTrainerDiffAug):
    """As many real samples as the stock trainer: each epoch runs stock / (1 - r_epoch) iterations."""
    equal_real_exposure = True


# ---- patch-level merging (DiffBoost) ------------------------------------------------------------

class nnUNetTrainerDiffAugPatchMix(nnUNetTrainerDiffAug):
    """Every real sample is paired with an aligned synthetic variant of the same case; the network's
    outputs on the two are merged patch by patch (real with probability ``patch_mix_alpha``) and
    trained against the real label. See ``patch_mix.py``. Validation stays real-only."""
    patch_mix_alpha: float = 0.6          # DiffBoost (Zhang et al., IEEE TMI 2024): P(patch real)
    patch_mix_patch: int | tuple = 64     # voxels per axis (DiffBoost: 64 px), at most half the training patch

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        if env_float(env_vars.SYNTHETIC_RATIO, 0.0, 0.0, 1.0) != 0:
            raise DiffAugError(f"{type(self).__name__} pairs every real sample with a synthetic variant and mixes "
                               f"no synthetic share into batches, so {env_vars.SYNTHETIC_RATIO}="
                               f"{os.environ[env_vars.SYNTHETIC_RATIO]} would be ignored: unset it, or train "
                               f"nnUNetTrainerDiffAug for ratio mixing. The real share of merge patches is "
                               f"{env_vars.PATCHMIX_ALPHA}.")
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.synthetic_ratio = 0.0  # no ratio mixing: every sample is a pair
        self.patch_mix_alpha = env_float(env_vars.PATCHMIX_ALPHA, type(self).patch_mix_alpha, 0.0, 1.0)
        self.patch_mix_patch = merge_patch_size(os.environ.get(env_vars.PATCHMIX_PATCH) or type(self).patch_mix_patch,
                                                self.configuration_manager.patch_size)
        self._patch_mix_network = None

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = nnUNetTrainer.get_tr_and_val_datasets(self)
        self._resolve_schedule(len(dataset_tr.identifiers))
        synthetic = self._prepare_synthetic_dataset(list(dataset_val.identifiers))
        variants = aligned_variants(self.synthetic_dataset_folder, synthetic.identifiers)
        self.print_to_log_file(f"DiffAug PatchMix: alpha = {self.patch_mix_alpha:.2f} (share of real patches), "
                               f"merge patch {list(self.patch_mix_patch)} voxels, "
                               f"{sum(len(v) for v in variants.values())} aligned variant(s)")
        return PairedDataset(dataset_tr, synthetic, variants), dataset_val

    def train_step(self, batch: dict) -> dict:
        # nnU-Net's train_step (AMP, grad scaling, clipping) runs unchanged around a network that
        # splits the stacked channels and merges the two outputs.
        network = self.network
        self.network = PatchMixForward(network, self.num_input_channels, self.patch_mix_patch, self.patch_mix_alpha)
        try:
            return nnUNetTrainer.train_step(self, batch)
        finally:
            self.network = network


class nnUNetTrainerDiffAugPatchMix_alpha80(nnUNetTrainerDiffAugPatchMix):
    patch_mix_alpha = 0.8


class nnUNetTrainerDiffAugPatchMix_alpha100(nnUNetTrainerDiffAugPatchMix):
    """alpha = 1: every patch real, so training equals the stock trainer's (a sanity check)."""
    patch_mix_alpha = 1.0


# ---- short runs ---------------------------------------------------------------------------------

class nnUNetTrainerDiffAug_5epochs(nnUNetTrainerDiffAug):
    default_num_epochs = 5
