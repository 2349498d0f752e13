"""Copies of pruned weights take the masks of their sources by rule: declared copies (`pruning_copies`,
e.g. momentum encoders) and whole-module copies other callbacks hold (Lightning's WeightAveraging / EMA).
No copy is scored, and none revives a pruned weight: not after updates, not at train end, not on resume."""
import copy
import os
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint, WeightAveraging
from torch.utils.data import DataLoader

from mflightning import MultiFlowCallback, prune
from mflightning.pruning import MaskKeeper
from mflightning.tasks.momentum import momentum_update_
from toy_models import GROUPS, ToyModule, make_batches
from toy_models import quiet_trainer as trainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tasks"))
from task_fixtures import BLIP, calibration_batch, make_tokenizer, retrieval_loaders  # noqa: E402

COMMON = dict(modalities=GROUPS, exclude=[r"head\."])


class ToyWithEMA(ToyModule):
    """The toy module plus an EMA copy of its model, declared as a copy (never trained by the optimizer)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.model_ema = copy.deepcopy(self.model).requires_grad_(False)
        self.pruning_copies = {"model_ema.": "model."}

    def training_step(self, batch, batch_idx):
        momentum_update_(self.model_ema, self.model, 0.9)
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def pruned_nonzeros(module, masks, rename=lambda n: n):
    params = dict(module.named_parameters())
    return sum(int((params[rename(name)].detach()[~kept] != 0).sum()) for name, kept in masks.items())


def test_declared_copies_are_not_scored_and_take_their_sources_masks():
    module = ToyWithEMA()
    result = prune(module, sparsity=0.5, method="omp", **COMMON)  # the preset's groups do not name model_ema.
    assert result.masks and not any(n.startswith("model_ema.") for n in result.masks)
    masks = result.masks_for(module)
    keeper = MaskKeeper(module, masks)
    assert set(keeper.copies) == {"model_ema." + n[len("model."):] for n in masks}
    ema = lambda n: "model_ema." + n[len("model."):]  # noqa: E731
    assert pruned_nonzeros(module, masks, ema) > 0  # the copy was made before pruning: dense
    keeper.zero_weights()
    assert pruned_nonzeros(module, masks) == pruned_nonzeros(module, masks, ema) == 0
    assert keeper.measured_sparsity()["total"] == pytest.approx(0.5, abs=0.02)  # copies are not counted
    assert keeper.full_masks().keys() == masks.keys()  # nor saved


def test_a_copy_rule_naming_no_parameter_or_the_wrong_shape_is_an_error():
    module = ToyWithEMA()
    masks = prune(module, sparsity=0.5, method="omp", **COMMON).masks_for(module)
    module.pruning_copies = {"model_emma.": "model."}
    with pytest.raises(ValueError, match="model_emma"):
        MaskKeeper(module, masks)
    module.pruning_copies = {"model_ema.": "model."}
    module.model_ema.text["fc1"] = torch.nn.Linear(16, 33)
    with pytest.raises(ValueError, match="does not match the shape"):
        MaskKeeper(module, masks)


def test_follow_masks_a_whole_module_copy_held_elsewhere():
    module = ToyWithEMA()
    masks = prune(module, sparsity=0.5, method="omp", **COMMON).masks_for(module)
    keeper = MaskKeeper(module, masks)
    outside = copy.deepcopy(module)  # e.g. an averaged model: same names, its own tensors
    assert keeper.follow(outside, label="avg:") == 2 * len(masks)  # the model and its declared copy
    assert pruned_nonzeros(outside, masks) == 0
    assert pruned_nonzeros(outside, masks, lambda n: "model_ema." + n[len("model."):]) == 0
    # an update made outside any optimizer (an EMA step from another source, a load) is undone by zero_copies
    with torch.no_grad():
        for p in outside.parameters():
            p.add_(1.0)
    assert pruned_nonzeros(outside, masks) > 0
    keeper.zero_copies()
    assert pruned_nonzeros(outside, masks) == 0
    assert pruned_nonzeros(outside, masks, lambda n: "model_ema." + n[len("model."):]) == 0


def loader(n=6, seed=1):
    return DataLoader(make_batches(n, seed=seed), batch_size=None)


def test_declared_copies_stay_zero_through_training_updates(tmp_path):
    module = ToyWithEMA()
    pruning = MultiFlowCallback(0.75, calibration=make_batches(2), **COMMON)
    trainer(tmp_path, max_epochs=2, callbacks=[pruning]).fit(module, loader())
    assert len(pruning.keeper.copies) == len(pruning.kept_masks)
    assert pruned_nonzeros(module, pruning.kept_masks, lambda n: "model_ema." + n[len("model."):]) == 0
    kept = pruning.kept_masks["model.text.fc1.weight"]
    assert (module.model_ema.text["fc1"].weight[kept] != 0).all()  # the EMA did move, only where kept


def _as_before(monkeypatch):
    """The callback as it was before copies were followed: other callbacks' copies stay dense."""
    monkeypatch.setattr(MultiFlowCallback, "_copies_held_elsewhere", lambda self, trainer, module: [])
    monkeypatch.setattr(MultiFlowCallback, "on_train_end", lambda self, trainer, module: None)


def ema_never_updating():
    # no update happens in this short run: at train end Lightning copies the averaged model, i.e. the
    # module as `setup` deep-copied it BEFORE pruning, back into the module
    return EMAWeightAveraging(decay=0.9, update_starting_at_step=10**6)


def test_weight_averaging_revived_pruned_weights_before_copies_were_followed(tmp_path, monkeypatch):
    _as_before(monkeypatch)
    module = ToyModule()
    pruning = MultiFlowCallback(0.75, calibration=make_batches(2), **COMMON)
    trainer(tmp_path, max_epochs=1, callbacks=[pruning, ema_never_updating()]).fit(module, loader())
    assert pruned_nonzeros(module, pruning.kept_masks) > 0.5 * sum(int((~m).sum()) for m in pruning.kept_masks.values())


@pytest.mark.parametrize("first", ["pruning", "averaging"])
def test_weight_averaging_cannot_revive_pruned_weights(tmp_path, first):
    module = ToyModule()
    pruning = MultiFlowCallback(0.75, calibration=make_batches(2), **COMMON)
    averaging = ema_never_updating()
    callbacks = [pruning, averaging] if first == "pruning" else [averaging, pruning]
    trainer(tmp_path, max_epochs=1, callbacks=callbacks).fit(module, loader())
    assert pruned_nonzeros(module, pruning.kept_masks) == 0
    assert pruned_nonzeros(averaging._average_model.module, pruning.kept_masks) == 0
    assert any(label.startswith("EMAWeightAveraging.") for label in pruning.keeper.copies)


def test_weight_averaging_checkpoints_and_resume_keep_the_average_sparse(tmp_path):
    module = ToyModule()
    pruning = MultiFlowCallback(0.75, calibration=make_batches(2), **COMMON)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    averaging = WeightAveraging(avg_fn=torch.optim.swa_utils.get_ema_avg_fn(0.9))
    trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[pruning, averaging, checkpoint]).fit(
        module, loader())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    masks = pruning.kept_masks
    for state in (saved["state_dict"], saved["current_model_state"]):  # the average, the module
        assert all((state[name][~kept] == 0).all() for name, kept in masks.items())
    resumed, pruning2, averaging2 = ToyModule(seed=3), MultiFlowCallback(0.75, **COMMON), WeightAveraging()
    trainer(tmp_path, max_epochs=2, callbacks=[pruning2, averaging2]).fit(
        resumed, loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert pruned_nonzeros(resumed, masks) == 0
    assert pruned_nonzeros(averaging2._average_model.module, masks) == 0


class QueueAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.queue = {k: v.clone() for k, v in pl_module.queue.state_dict().items()}
        self.momentum = {n: p.detach().clone() for n, p in pl_module.backbone_m.named_parameters()}


def test_retrieval_momentum_encoders_carry_the_masks_through_training_and_resume(tmp_path):
    tokenizer = make_tokenizer(tmp_path)
    L.seed_everything(0)
    module = BLIP.module("retrieval", tokenizer, lr=1e-3, queue_size=8)
    train, _ = retrieval_loaders(tokenizer)
    pruning = MultiFlowCallback(0.5, calibration=[calibration_batch(tokenizer)])
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, enable_checkpointing=True,
            callbacks=[pruning, checkpoint]).fit(module, train)
    masks = pruning.kept_masks
    momentum = lambda n: "backbone_m." + n[len("backbone."):]  # noqa: E731
    copied = [n for n in masks if momentum(n) in dict(module.named_parameters())]
    assert copied and all(n.startswith(("backbone.vision_model.", "backbone.text_encoder.")) for n in copied)
    assert not any(n.startswith("backbone_m.") for n in pruning.result.masks)  # never scored
    assert len(pruning.keeper.copies) == len(copied)
    assert pruned_nonzeros(module, {n: masks[n] for n in copied}, momentum) == 0
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert int(saved["queue.filled"]) == 8

    L.seed_everything(1)
    resumed = BLIP.module("retrieval", tokenizer, lr=1e-3, queue_size=8)  # other weights, empty queue
    probe, pruning2 = QueueAtStart(), MultiFlowCallback(0.5, calibration=[calibration_batch(tokenizer)])
    trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[pruning2, probe]).fit(
        resumed, train, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for key, value in probe.queue.items():
        assert torch.equal(value, saved["queue." + key]), key
    for name, value in probe.momentum.items():
        assert torch.equal(value, saved["backbone_m." + name]), name
    assert pruned_nonzeros(resumed, {n: masks[n] for n in copied}, momentum) == 0


class _HoldsTeacher(Callback):
    """A distillation-style callback holding another model of the same architecture (not a copy)."""

    def __init__(self, teacher):
        self.teacher = teacher


def test_a_look_alike_module_another_callback_holds_is_never_masked(tmp_path):
    module, teacher = ToyModule(), ToyModule()
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_()
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    pruning = MultiFlowCallback(0.75, calibration=make_batches(2), **COMMON)
    trainer(tmp_path, max_epochs=1, callbacks=[pruning, _HoldsTeacher(teacher)]).fit(module, loader())
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())
    assert not any(label.startswith("_HoldsTeacher.") for label in pruning.keeper.copies)


def test_a_callback_can_declare_its_copy_and_a_mismatched_one_is_an_error(tmp_path):
    class Declares(_HoldsTeacher):
        pruning_copies_of_module = ("teacher",)

    module = ToyModule()
    pruning = MultiFlowCallback(0.75, calibration=make_batches(2), **COMMON)
    held = Declares(copy.deepcopy(module))
    trainer(tmp_path, max_epochs=1, callbacks=[pruning, held]).fit(module, loader())
    assert pruned_nonzeros(held.teacher, pruning.kept_masks) == 0
    bad = Declares(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="Declares.teacher holds a copy of the module whose parameters do not match"):
        trainer(tmp_path, max_epochs=1, callbacks=[MultiFlowCallback(0.75, calibration=make_batches(2), **COMMON),
                                                   bad]).fit(ToyModule(), loader())


def test_masks_of_the_bare_model_find_the_source_not_the_copy_and_apply_zeroes_the_copy():
    """Mask names of the bare model fit both `model.` and the copy `model_ema.`: the copy is never a candidate."""
    module = ToyWithEMA()
    result = prune(module.model, sparsity=0.5, method="omp")
    resolved = result.apply(module)
    assert resolved and all(n.startswith("model.") for n in resolved)
    assert pruned_nonzeros(module, resolved) == 0
    assert pruned_nonzeros(module, resolved, lambda n: "model_ema." + n[len("model."):]) == 0  # the copy too
    with pytest.raises(ValueError, match="prefix 'model_ema.' names a declared copy"):
        result.masks_for(module, prefix="model_ema.")
