"""Guards for code that follows nnU-Net's own methods closely (diffusers checks its "Copied from" blocks the
same way): when nnU-Net changes one of these methods, this test fails and names what to review.

- ``nnUNetTrainerDiffAug.get_dataloaders`` mirrors ``nnUNetTrainer.get_dataloaders`` with our
  ``RatioDataLoader`` swapped in for the training loader;
- ``RatioDataLoader.get_indices`` replaces ``nnUNetDataLoader.get_indices`` (infinite sampling);
- the schedules and equal real exposure rely on ``nnUNetTrainer.run_training`` reading
  ``num_iterations_per_epoch`` each epoch and calling ``on_train_epoch_start`` before drawing batches.

After reviewing our copy against the new upstream source, update the hash here.
"""
import hashlib
import inspect

import pytest
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

# sha256 (first 16 hex digits) of the upstream source, nnunetv2 2.8.1
UPSTREAM = {
    "nnUNetTrainer.get_dataloaders": (nnUNetTrainer.get_dataloaders, "5f59e2b907cfa2d1",
                                      "nnunet_diffaug/trainers/nnUNetTrainerDiffAug.py: get_dataloaders"),
    "nnUNetDataLoader.get_indices": (nnUNetDataLoader.get_indices, "5364e15dd0a2ad39",
                                     "nnunet_diffaug/trainers/mixing.py: RatioDataLoader.get_indices"),
    "nnUNetTrainer.run_training": (nnUNetTrainer.run_training, "135206abd4ea62ec",
                                   "nnunet_diffaug/trainers: the synthetic-share schedule and equal real exposure"),
}


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_upstream_source_is_the_one_our_copy_follows(name):
    function, expected, ours = UPSTREAM[name]
    digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
    assert digest == expected, (f"nnU-Net's {name} changed (source hash {digest}, our copy follows {expected}). "
                                f"Review {ours} against it, then update the hash in {__file__}.")
