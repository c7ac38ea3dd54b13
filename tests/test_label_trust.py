"""Untrusted classes: ignored in the loss on synthetic samples only, through nnU-Net's own loss."""
import pytest
import torch

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.trainers.label_trust import loss_with_ignore_value, mask_untrusted, parse_untrusted_classes

LABELS = {"background": 0, "ribs": 1, "spine": 2, "lung": 3}


def _nnunet_loss():
    # what nnUNetTrainer._build_loss builds for a label (not region) dataset, with deep supervision
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(loss, [2 / 3, 1 / 3])


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = [torch.randint(0, 4, (4, 1, 8, 8), generator=g).to(torch.int16),
              torch.randint(0, 4, (4, 1, 4, 4), generator=g).to(torch.int16)]
    logits = [torch.randn(4, 4, 8, 8, generator=g, requires_grad=True),
              torch.randn(4, 4, 4, 4, generator=g, requires_grad=True)]
    return logits, target


def test_class_names_and_values_are_parsed_and_bad_ones_refused():
    assert parse_untrusted_classes("ribs", LABELS, "X") == (1,)
    assert parse_untrusted_classes("lung, 1", LABELS, "X") == (1, 3)
    assert parse_untrusted_classes("", LABELS, "X") == ()
    assert parse_untrusted_classes(("spine",), LABELS, "X") == (2,)
    for bad in ("liver", "background", "0", "7", "ribs,,liver"):
        with pytest.raises(DiffAugError, match=r"DIFFAUG_UNTRUSTED_CLASSES: .* is not a foreground class.*ribs \(1\)"):
            parse_untrusted_classes(bad, LABELS, "DIFFAUG_UNTRUSTED_CLASSES")


def test_a_loss_with_the_ignore_value_is_unchanged_on_real_targets():
    logits, target = _batch()
    stock = _nnunet_loss()(logits, target)
    ignoring = loss_with_ignore_value(_nnunet_loss(), 4)(logits, target)
    assert torch.allclose(stock, ignoring, atol=1e-6)


def test_untrusted_voxels_of_synthetic_samples_give_no_gradient_and_others_still_do():
    logits, target = _batch()
    synthetic = [False, True, False, True]
    changed = mask_untrusted(target, synthetic, (1,), 4)
    assert changed > 0
    for t in target:
        # only synthetic rows, only class 1, every deep-supervision scale
        assert (t[[0, 2]] != 4).all() and not (t[[1, 3]] == 1).any() and (t[[1, 3]] == 4).any()
    loss = loss_with_ignore_value(_nnunet_loss(), 4)
    loss(logits, target).backward()
    grad, ignored = logits[0].grad, (target[0] == 4).expand_as(logits[0].grad)
    assert grad[ignored].abs().max() == 0
    # real rows still learn class 1, synthetic rows still learn the other classes
    real_rib = (target[0][[0, 2]] == 1).expand(-1, 4, -1, -1)
    assert grad[[0, 2]][real_rib].abs().sum() > 0
    synthetic_lung = (target[0][[1, 3]] == 3).expand(-1, 4, -1, -1)
    assert grad[[1, 3]][synthetic_lung].abs().sum() > 0


def test_predictions_at_ignored_voxels_do_not_change_the_loss():
    logits, target = _batch(seed=1)
    mask_untrusted(target, [True, True, False, False], (2, 3), 4)
    loss = loss_with_ignore_value(_nnunet_loss(), 4)
    before = loss(logits, target)
    moved = [lg.detach().clone() for lg in logits]
    for lg, t in zip(moved, target):
        lg[(t == 4).expand_as(lg)] += 5 * torch.randn(int((t == 4).sum()) * 4)
    assert torch.allclose(before, loss(moved, target), atol=1e-5)
    # ... while moving them at trusted voxels does
    shifted = [lg.detach().clone() + 3 * (t != 4).expand_as(lg) * torch.randn_like(lg) for lg, t in zip(logits, target)]
    assert not torch.allclose(before, loss(shifted, target), atol=1e-3)


def test_nothing_is_masked_without_synthetic_samples_or_classes():
    _, target = _batch()
    kept = [t.clone() for t in target]
    assert mask_untrusted(target, [False] * 4, (1,), 4) == 0
    assert mask_untrusted(target, [True] * 4, (), 4) == 0
    assert all(torch.equal(a, b) for a, b in zip(kept, target))
