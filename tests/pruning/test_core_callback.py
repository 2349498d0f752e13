"""MultiFlowCallback in real Trainer runs: sparsity survives fine-tuning, resume, mask files, precision."""
import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from mflightning import MultiFlowCallback, PruningResult, prune
from mflightning.pruning.upkeep import unpack_mask
from toy_models import GROUPS, ToyModule, make_batches
from toy_models import quiet_trainer as trainer

COMMON = dict(modalities=GROUPS, exclude=[r"head\."])




def loader(n=8, seed=1):
    return DataLoader(make_batches(n, seed=seed), batch_size=None)


def assert_pruned_weights_are_zero(callback, module):
    params = dict(module.named_parameters())
    assert callback.kept_masks
    for name, kept in callback.kept_masks.items():
        assert (params[name].detach()[~kept] == 0).all(), name


def test_sparsity_survives_adamw_clipping_and_accumulation(tmp_path):
    module = ToyModule()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    callback = MultiFlowCallback(0.75, calibration=make_batches(4), **COMMON)
    trainer(tmp_path, max_epochs=2, gradient_clip_val=0.5, accumulate_grad_batches=3, callbacks=[callback]).fit(
        module, loader()
    )
    assert_pruned_weights_are_zero(callback, module)
    assert callback.measured_sparsity(module)["total"] == pytest.approx(0.75, abs=0.01)
    # training did happen: kept weights moved
    kept = callback.kept_masks["model.text.fc1.weight"]
    assert not torch.equal(module.model.text.fc1.weight[kept], before["model.text.fc1.weight"][kept])
    assert module.calibration_calls == 4


class GradientProbe(L.Callback):
    """Records the largest pruned-gradient magnitude seen by gradient clipping."""

    def __init__(self, pruning: MultiFlowCallback):
        self.pruning = pruning
        self.seen = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = dict(pl_module.named_parameters())
        self.seen.append(max(params[n].grad[~m].abs().max().item() for n, m in self.pruning.kept_masks.items()))


def test_pruned_gradients_are_zero_before_clipping_and_the_step(tmp_path):
    callback = MultiFlowCallback(0.5, method="omp", **COMMON)
    probe = GradientProbe(callback)  # runs after the pruning callback, like gradient clipping does
    trainer(tmp_path, max_steps=3, gradient_clip_val=1.0, callbacks=[callback, probe]).fit(ToyModule(), loader())
    assert probe.seen and max(probe.seen) == 0.0


class TwoOptimizers(ToyModule):
    """Manual optimization with one optimizer per modality."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        opt_v, opt_t = self.optimizers()
        opt_v.zero_grad()
        opt_t.zero_grad()
        self.manual_backward(loss)
        opt_v.step()
        if batch_idx % 2 == 0:
            opt_t.step()
        return loss

    def configure_optimizers(self):
        vision = [p for n, p in self.named_parameters() if n.startswith("model.vision")]
        rest = [p for n, p in self.named_parameters() if not n.startswith("model.vision")]
        return torch.optim.SGD(vision, lr=0.5, momentum=0.9, weight_decay=0.1), torch.optim.AdamW(rest, lr=0.05)


def test_several_optimizers_keep_their_weights_sparse(tmp_path):
    module = TwoOptimizers()
    callback = MultiFlowCallback(0.6, calibration=make_batches(2), **COMMON)
    trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(module, loader())
    assert_pruned_weights_are_zero(callback, module)


def test_resume_restores_masks_without_calibrating(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = MultiFlowCallback(0.7, calibration=make_batches(3), **COMMON)
    trainer(tmp_path, max_epochs=1, callbacks=[first, checkpoint], enable_checkpointing=True).fit(ToyModule(), loader())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if "MultiFlowCallback" in k)
    for name, packed in state["packed_masks"].items():
        kept = unpack_mask(packed, state["mask_shapes"][name])
        assert (saved["state_dict"][name][~kept] == 0).all(), "checkpointed weights must be truly sparse"

    resumed_module = ToyModule(seed=5)
    second = MultiFlowCallback(0.7, calibration=make_batches(3), **COMMON)
    trainer(tmp_path, max_epochs=2, callbacks=[second]).fit(
        resumed_module, loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert resumed_module.calibration_calls == 0
    assert second.kept_masks.keys() == first.kept_masks.keys()
    for name, kept in first.kept_masks.items():
        assert torch.equal(second.kept_masks[name], kept)
    assert_pruned_weights_are_zero(second, resumed_module)


def test_a_mask_file_is_applied_without_calibration_and_logged(tmp_path):
    module = ToyModule()
    result = prune(module.model, sparsity=0.8, calibration=make_batches(2),
                   forward=lambda m, b: m(b["image"], b["input_ids"], b["attention_mask"]), **COMMON)
    path = result.save(tmp_path / "masks.safetensors")
    callback = MultiFlowCallback(masks=path)
    logger = CSVLogger(tmp_path, name="log")
    trainer(tmp_path, max_steps=4, callbacks=[callback], logger=logger).fit(module, loader())
    assert module.calibration_calls == 0
    assert_pruned_weights_are_zero(callback, module)
    assert set(callback.kept_masks) == {f"model.{n}" for n in result.masks}
    with open(logger.log_dir + "/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith("pruning/") and v}
    assert logged["pruning/sparsity"] == pytest.approx(result.sparsity)
    assert set(logged) == {"pruning/sparsity", "pruning/sparsity_vision", "pruning/sparsity_text"}


class ZeroOneKeptWeightAt(L.Callback):
    """Sets kept weights to exactly zero after step `step`: the next sparsity logged must show it."""

    def __init__(self, pruning, step):
        self.pruning, self.step = pruning, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            kept = self.pruning.kept_masks["model.text.fc1.weight"]
            with torch.no_grad():
                pl_module.model.text.fc1.weight[kept] = 0.0


def test_sparsity_is_measured_and_logged_as_training_goes(tmp_path):
    """`pruning/sparsity` is logged at pruning time and every `log_every_n_steps` steps after, measured
    on the weights (a kept layer driven to zero raises it), once per step under gradient accumulation."""
    module = ToyModule(lr=0.0, weight_decay=0.0)  # nothing else moves the zeros
    pruning = MultiFlowCallback(0.5, calibration=make_batches(2), **COMMON)
    logger = CSVLogger(tmp_path, name="log")
    trainer(tmp_path, max_steps=6, log_every_n_steps=2, accumulate_grad_batches=2, logger=logger,
            callbacks=[pruning, ZeroOneKeptWeightAt(pruning, 3)]).fit(module, loader(12))
    with open(logger.log_dir + "/metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("pruning/sparsity")]
    logged = {int(row["step"]): float(row["pruning/sparsity"]) for row in rows}
    assert len(rows) == len(logged) == 4 and sorted(logged) == [0, 2, 4, 6]
    fc1 = module.model.text.fc1.weight.numel()
    total = sum(m.numel() for m in pruning.kept_masks.values())
    assert logged[0] == logged[2] == pytest.approx(0.5, abs=0.01)
    zeroed = float(pruning.kept_masks["model.text.fc1.weight"].sum())
    assert logged[4] == logged[6] == pytest.approx(logged[2] + zeroed / total) and zeroed < fc1


class WithCalibrationData(L.LightningDataModule):
    def train_dataloader(self):
        return loader()

    def calibration_dataloader(self):
        return DataLoader(make_batches(3, seed=7), batch_size=None)


class Evaluated(ToyModule):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))


def test_calibration_comes_from_the_datamodule_and_validate_alone_prunes(tmp_path):
    module = ToyModule()
    callback = MultiFlowCallback(0.5, save_masks=tmp_path / "out" / "m.safetensors", **COMMON)
    trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(module, datamodule=WithCalibrationData())
    assert module.calibration_calls == 3
    assert PruningResult.load(tmp_path / "out" / "m.safetensors").sparsity == pytest.approx(0.5, abs=0.01)

    fresh = Evaluated()
    evaluator = MultiFlowCallback(masks=tmp_path / "out" / "m.safetensors")
    trainer(tmp_path, callbacks=[evaluator]).validate(fresh, loader(2))
    assert_pruned_weights_are_zero(evaluator, fresh)


def test_bf16_mixed_precision_calibrates_in_fp32_and_stays_sparse(tmp_path):
    module = ToyModule()
    callback = MultiFlowCallback(0.6, calibration=make_batches(3), **COMMON)
    trainer(tmp_path, max_steps=4, precision="bf16-mixed", callbacks=[callback]).fit(module, loader())
    assert_pruned_weights_are_zero(callback, module)
    # the same masks as an fp32 run: bf16 autocast changes activations slightly, statistics stay fp32
    reference = prune(ToyModule(), sparsity=0.6, calibration=make_batches(3),
                      forward=lambda m, b: m.calibration_step(b), **COMMON)
    agreement = torch.cat([
        (callback.kept_masks[n] == reference.masks[n]).flatten() for n in reference.masks
    ]).float().mean()
    assert agreement > 0.97


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("16-true", torch.float16),
                                              ("64-true", torch.float64)])
def test_true_precisions_convert_calibration_batches_like_training_batches(tmp_path, precision, dtype):
    """Under a "-true" precision the module's weights change dtype; calibration batches go through the
    precision plugin's `convert_input` as training batches do (they crashed with a dtype mismatch)."""
    module = ToyModule()
    callback = MultiFlowCallback(0.6, calibration=make_batches(3), **COMMON)
    trainer(tmp_path, max_steps=2, precision=precision, callbacks=[callback]).fit(module, loader(2))
    assert module.model.vision[0].weight.dtype == dtype and module.calibration_calls == 3
    assert_pruned_weights_are_zero(callback, module)
    reference = prune(ToyModule(), sparsity=0.6, calibration=make_batches(3),
                      forward=lambda m, b: m.calibration_step(b), **COMMON)
    agreement = torch.cat([(callback.kept_masks[n] == reference.masks[n]).flatten() for n in reference.masks])
    assert agreement.float().mean() >= (1.0 if dtype == torch.float64 else 0.99)


def test_bad_callback_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="sparsity must be in"):
        MultiFlowCallback(1.0)
    with pytest.raises(ValueError, match="unknown pruning method 'nope'"):
        MultiFlowCallback(0.5, method="nope")
    with pytest.raises(ValueError, match="needs a sparsity"):
        MultiFlowCallback()
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        MultiFlowCallback(masks=tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="needs calibration batches"):
        trainer(tmp_path, max_steps=1, callbacks=[MultiFlowCallback(0.5, **COMMON)]).fit(ToyModule(), loader())
    with pytest.raises(ValueError, match="yielded no batches"):
        trainer(tmp_path, max_steps=1, callbacks=[MultiFlowCallback(0.5, calibration=[], **COMMON)]).fit(
            ToyModule(), loader()
        )


class InfEveryOtherStep(ToyModule):
    def training_step(self, batch, batch_idx):
        self.autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx % 2 == 0 else loss


def test_skipped_amp_steps_leave_the_weights_alone(tmp_path, monkeypatch):
    """fp16 autocast with a GradScaler on CPU: the explicit plugin is needed (the string
    precision="16-mixed" means bf16 on CPU, without a scaler)."""
    from lightning.pytorch.plugins import MixedPrecision

    module = InfEveryOtherStep()
    callback = MultiFlowCallback(0.5, method="omp", **COMMON)
    real_steps = []
    original = callback._after_step
    monkeypatch.setattr(callback, "_after_step", lambda *a: (real_steps.append(1), original(*a)))
    scaler = torch.amp.GradScaler("cpu")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer(tmp_path, max_steps=6, plugins=[plugin], callbacks=[callback]).fit(module, loader())
    assert module.autocast == (True, torch.float16)
    assert len(real_steps) == 3  # the scaler skipped the three steps with an infinite loss
    assert scaler.get_scale() < 2.0 ** 16  # and lowered its scale
    assert_pruned_weights_are_zero(callback, module)
    assert all(torch.isfinite(p).all() for p in module.parameters())
