"""MultiFlowCallback in training scripts nobody here wrote: a transformers encoder under Lightning's
BaseFinetuning, a callback reused for a second module, mask files re-thresholded, unsupported strategies."""
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader
from transformers import BertConfig, BertModel

from mflightning import MultiFlowCallback, PruningResult, prune
from toy_models import GROUPS, ToyModule, make_batches
from toy_models import quiet_trainer as trainer

COMMON = dict(modalities=GROUPS, exclude=[r"head\."])




def text_batches(n=6, batch_size=4, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(3, length + 1, (batch_size,), generator=g)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        out.append({"input_ids": torch.randint(1, 50, (batch_size, length), generator=g) * mask,
                    "attention_mask": mask, "label": torch.randint(0, 3, (batch_size,), generator=g)})
    return out


class BertClassifier(L.LightningModule):
    """A small transformers BERT encoder with a classification head, trained with AdamW."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=16)
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids, attention_mask, **_):
        return self.head(self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0])

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(**batch), batch["label"])

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)


class UnfreezeEncoderAtEpoch1(BaseFinetuning):
    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.encoder)

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.encoder, optimizer, lr=0.05)


def zero_where_pruned(callback, module):
    params = dict(module.named_parameters())
    return all((params[n].detach()[~kept] == 0).all() for n, kept in callback.kept_masks.items())


def test_base_finetuning_unfrozen_encoder_stays_sparse(tmp_path):
    module = BertClassifier()
    pruning = MultiFlowCallback(0.5, calibration=text_batches(3), exclude=[r"^head\."])
    before = module.encoder.encoder.layer[0].intermediate.dense.weight.detach().clone()
    trainer(tmp_path, max_epochs=3, callbacks=[UnfreezeEncoderAtEpoch1(), pruning]).fit(
        module, DataLoader(text_batches(), batch_size=None)
    )
    assert any(n.startswith("encoder.") for n in pruning.kept_masks)
    assert zero_where_pruned(pruning, module)
    assert pruning.measured_sparsity()["total"] == pytest.approx(0.5, abs=0.01)
    after = module.encoder.encoder.layer[0].intermediate.dense.weight.detach()
    assert not torch.equal(before.mul(after != 0), after), "the unfrozen encoder trained"


def test_a_reused_callback_prunes_the_second_module_too(tmp_path):
    pruning = MultiFlowCallback(0.6, calibration=make_batches(2), **COMMON)
    first, second = ToyModule(), ToyModule(seed=3)
    trainer(tmp_path, max_steps=2, callbacks=[pruning]).fit(first, DataLoader(make_batches(4), batch_size=None))
    first_masks = {n: m.clone() for n, m in pruning.kept_masks.items()}
    trainer(tmp_path, max_steps=2, callbacks=[pruning]).fit(second, DataLoader(make_batches(4), batch_size=None))
    assert second.calibration_calls == 2, "the second module was calibrated"
    assert zero_where_pruned(pruning, second)
    assert pruning.measured_sparsity()["total"] == pytest.approx(0.6, abs=0.01)
    # its own masks (other weights), not the first module's
    assert any(not torch.equal(first_masks[n], pruning.kept_masks[n]) for n in first_masks)


class WithTestStep(ToyModule):
    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.training_step(batch, batch_idx))


def test_a_checkpoint_loaded_for_testing_never_reaches_the_next_module(tmp_path):
    """fit(m1), test(m1, ckpt_path=...), then fit(m2) with the same callback: m2 is calibrated and gets
    its own masks, not those of m1's checkpoint."""
    pruning = MultiFlowCallback(0.6, calibration=make_batches(2), **COMMON)
    first, second = WithTestStep(), WithTestStep(seed=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    run = trainer(tmp_path, max_steps=2, callbacks=[pruning, checkpoint], enable_checkpointing=True)
    run.fit(first, DataLoader(make_batches(4), batch_size=None))
    first_masks = {n: m.clone() for n, m in pruning.kept_masks.items()}
    run.test(first, DataLoader(make_batches(1), batch_size=None), ckpt_path="last")
    assert all(torch.equal(first_masks[n], pruning.kept_masks[n]) for n in first_masks)
    trainer(tmp_path, max_steps=2, callbacks=[pruning]).fit(second, DataLoader(make_batches(4), batch_size=None))
    assert second.calibration_calls == 2, "the second module was calibrated"
    assert any(not torch.equal(first_masks[n], pruning.kept_masks[n]) for n in first_masks)
    assert zero_where_pruned(pruning, second)


def test_resuming_a_module_the_callback_already_pruned_takes_the_checkpoint_masks(tmp_path):
    """fit(model, ckpt_path=X) after the callback pruned `model` at 0.5: X's masks (0.8) apply, with a
    warning, and X's pruned weights stay zero through training."""
    x_pruning = MultiFlowCallback(0.8, calibration=make_batches(2, seed=9), **COMMON)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "x", save_last=True)
    trainer(tmp_path, max_steps=2, callbacks=[x_pruning, checkpoint], enable_checkpointing=True).fit(
        ToyModule(seed=1), DataLoader(make_batches(2), batch_size=None))
    x_masks = {n: m.clone() for n, m in x_pruning.kept_masks.items()}

    pruning = MultiFlowCallback(0.5, calibration=make_batches(2), **COMMON)
    module = ToyModule(seed=2)
    trainer(tmp_path, max_steps=2, callbacks=[pruning]).fit(module, DataLoader(make_batches(2), batch_size=None))
    assert pruning.measured_sparsity()["total"] == pytest.approx(0.5, abs=0.01)
    with pytest.warns(UserWarning, match=r"checkpoint's masks \(sparsity 0.8\) replace the masks this callback "
                                         r"applied to the module \(sparsity 0.5\): [\d,]+ mask entries change"):
        trainer(tmp_path, max_steps=4, callbacks=[pruning]).fit(
            module, DataLoader(make_batches(4), batch_size=None), ckpt_path=tmp_path / "x" / "last.ckpt")
    assert all(torch.equal(pruning.kept_masks[n], x_masks[n]) for n in x_masks)
    assert zero_where_pruned(pruning, module)
    assert pruning.measured_sparsity()["total"] == pytest.approx(0.8, abs=0.01)
    assert pruning.state_dict()["target_sparsity"] == 0.8


def test_masks_with_another_sparsity_rethreshold_the_stored_scores(tmp_path):
    scores = prune(ToyModule().model, sparsity=0.5, calibration=make_batches(2),
                   forward=lambda m, b: m(b["image"], b["input_ids"], b["attention_mask"]), **COMMON)
    with_scores = scores.save(tmp_path / "scores.safetensors", include_scores=True)
    mask_only = scores.save(tmp_path / "masks.safetensors")
    module = ToyModule()
    callback = MultiFlowCallback(sparsity=0.8, masks=with_scores)
    trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(module, DataLoader(make_batches(2), batch_size=None))
    assert module.calibration_calls == 0
    assert callback.measured_sparsity()["total"] == pytest.approx(0.8, abs=0.01)
    with pytest.raises(ValueError, match="holds no scores to re-threshold"):
        trainer(tmp_path, max_steps=1, callbacks=[MultiFlowCallback(sparsity=0.8, masks=mask_only)]).fit(
            ToyModule(), DataLoader(make_batches(2), batch_size=None)
        )


def test_the_callback_can_save_rethresholdable_scores(tmp_path):
    path = tmp_path / "out.safetensors"
    callback = MultiFlowCallback(0.5, calibration=make_batches(2), save_masks=path, save_scores=True, **COMMON)
    trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(ToyModule(), DataLoader(make_batches(2), batch_size=None))
    saved = PruningResult.load(path)
    assert saved.scores is not None
    assert saved.at(0.7).sparsity == pytest.approx(0.7, abs=0.01)


def test_resuming_with_another_sparsity_warns_and_keeps_the_checkpoint_masks(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = MultiFlowCallback(0.7, calibration=make_batches(2), **COMMON)
    trainer(tmp_path, max_epochs=1, callbacks=[first, checkpoint], enable_checkpointing=True).fit(
        ToyModule(), DataLoader(make_batches(2), batch_size=None)
    )
    second = MultiFlowCallback(0.3, calibration=make_batches(2), **COMMON)
    module = ToyModule(seed=4)
    with pytest.warns(UserWarning, match="checkpoint's masks \\(sparsity 0.7\\) apply, not sparsity=0.3"):
        trainer(tmp_path, max_epochs=2, callbacks=[second]).fit(
            module, DataLoader(make_batches(2), batch_size=None), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )
    assert module.calibration_calls == 0
    assert second.measured_sparsity()["total"] == pytest.approx(0.7, abs=0.01)
    assert second.state_dict()["target_sparsity"] == 0.7, "a later checkpoint records the masks' own sparsity"


@pytest.mark.parametrize("name", ["DeepSpeedStrategy", "FSDPStrategy"])
def test_an_unsupported_strategy_stops_in_setup_naming_it(name):
    """DeepSpeed (not installed here) and FSDP1 (refuses CPU) cannot run on this machine, so the check
    sees an instance made without its constructor, as the Trainer would hold it."""
    import types

    import lightning.pytorch.strategies as strategies

    cls = getattr(strategies, name)
    fake_trainer = types.SimpleNamespace(strategy=cls.__new__(cls))
    callback = MultiFlowCallback(0.5, method="omp", **COMMON)
    with pytest.raises(RuntimeError, match=f"does not support the {name} strategy"):
        callback.setup(fake_trainer, ToyModule(), "fit")


class TinyTorchvisionViT(L.LightningModule):
    """torchvision's VisionTransformer (nn.MultiheadAttention inside) as an image classifier."""

    def __init__(self):
        super().__init__()
        from torchvision.models import VisionTransformer

        torch.manual_seed(0)
        self.vit = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                                     mlp_dim=32, num_classes=3)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.vit(batch["pixel_values"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


def image_batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(4, 3, 16, 16, generator=g), "label": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(n)]


def test_torchvision_vit_attention_weights_are_pruned_and_stay_zero(tmp_path):
    module = TinyTorchvisionViT()
    pruning = MultiFlowCallback(0.5, calibration=image_batches(2), exclude=[r"^vit\.heads\."],
                                forward=lambda model, batch: model.vit(batch["pixel_values"]))
    trainer(tmp_path, max_steps=4, callbacks=[pruning]).fit(module, DataLoader(image_batches(), batch_size=None))
    names = set(pruning.kept_masks)
    assert {"vit.encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
            "vit.encoder.layers.encoder_layer_0.self_attention.out_proj.weight"} <= names
    assert zero_where_pruned(pruning, module)
    attention = module.vit.encoder.layers[0].self_attention.in_proj_weight
    assert (attention == 0).float().mean().item() > 0.3


def test_a_failing_calibration_forward_names_calibration_the_batch_and_the_forward(tmp_path):
    from mflightning.pruning import CalibrationError

    class TakesNoLabel(BertClassifier):
        def forward(self, input_ids, attention_mask):  # the calibration batches also hold "label"
            return super().forward(input_ids, attention_mask)

    pruning = MultiFlowCallback(0.5, calibration=text_batches(2), exclude=[r"^head\."])
    with pytest.raises(CalibrationError, match=r"batch 0: the forward `pl_module\(\*\*batch\).*'label'") as caught:
        trainer(tmp_path, max_steps=1, callbacks=[pruning]).fit(TakesNoLabel(), DataLoader(text_batches(), batch_size=None))
    assert isinstance(caught.value.__cause__, TypeError)


class MomentumToy(ToyModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class ZeroAfterEveryStep(L.Callback):
    """Records, after each training batch, whether every pruned weight is exactly zero."""

    def __init__(self, pruning):
        self.pruning, self.checks = pruning, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.checks.append(zero_where_pruned(self.pruning, pl_module))


def test_momentum_restored_from_a_dense_checkpoint_cannot_revive_pruned_weights(tmp_path):
    """Pruning a dense run on resume: the SGD momentum of the checkpoint predates the masks, so only
    the re-zeroing after each step keeps the pruned weights at zero (zeroed gradients are not enough)."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "dense", save_last=True)
    trainer(tmp_path, max_epochs=1, callbacks=[checkpoint], enable_checkpointing=True).fit(
        MomentumToy(), DataLoader(make_batches(4), batch_size=None)
    )
    pruning = MultiFlowCallback(0.6, calibration=make_batches(2), **COMMON)
    probe = ZeroAfterEveryStep(pruning)
    trainer(tmp_path, max_epochs=2, callbacks=[pruning, probe]).fit(
        MomentumToy(), DataLoader(make_batches(4), batch_size=None), ckpt_path=tmp_path / "dense" / "last.ckpt"
    )
    assert len(probe.checks) == 4 and all(probe.checks)


def test_checkpointed_masks_are_bit_packed_and_old_bool_checkpoints_still_resume(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = MultiFlowCallback(0.7, calibration=make_batches(2), **COMMON)
    trainer(tmp_path, max_epochs=1, callbacks=[first, checkpoint], enable_checkpointing=True).fit(
        ToyModule(), DataLoader(make_batches(2), batch_size=None)
    )
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=False)
    key = next(k for k in saved["callbacks"] if "MultiFlowCallback" in k)
    state = saved["callbacks"][key]
    packed_bytes = sum(p.numel() for p in state["packed_masks"].values())
    weights = sum(m.numel() for m in first.kept_masks.values())
    assert packed_bytes == sum(-(-n // 8) for n in (m.numel() for m in first.kept_masks.values()))
    assert packed_bytes * 32 < weights * 4 * 1.05, "about 1/32 of the fp32 weights"
    # a checkpoint written before packing: bool masks under "masks"
    saved["callbacks"][key] = {"masks": {n: m.clone() for n, m in first.kept_masks.items()},
                               "groups": state["groups"], "method": state["method"]}
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    for ckpt in (path, old):
        second = MultiFlowCallback(0.7, calibration=make_batches(2), **COMMON)
        module = ToyModule(seed=2)
        trainer(tmp_path, max_epochs=2, callbacks=[second]).fit(module, DataLoader(make_batches(2), batch_size=None),
                                                              ckpt_path=ckpt)
        assert module.calibration_calls == 0
        assert all(torch.equal(second.kept_masks[n], m) for n, m in first.kept_masks.items())


def test_a_transformers_bert_fine_tuned_under_2_4_keeps_the_pattern(tmp_path):
    from mflightning.pruning import pattern_violations

    module = BertClassifier()
    pruning = MultiFlowCallback(pattern="2:4", calibration=text_batches(2), exclude=[r"^head\."])
    trainer(tmp_path, max_steps=4, callbacks=[pruning]).fit(module, DataLoader(text_batches(), batch_size=None))
    params = dict(module.named_parameters())
    assert any("attention.self.query" in n for n in pruning.kept_masks)
    nonzero = {n: params[n].detach() != 0 for n in pruning.kept_masks}
    assert pattern_violations(nonzero, "2:4") == {}
    assert pruning.measured_sparsity()["total"] == pytest.approx(0.5, abs=1e-3)


def test_a_pickled_callback_carries_its_masks_to_the_module_it_pruned_only(tmp_path):
    """ddp_spawn pickles the callback into its workers: the masks travel with it (figures and masks known
    without a module), a fit of the module that carries them keeps them, a fresh module is calibrated."""
    import pickle

    pruning = MultiFlowCallback(0.6, calibration=make_batches(2), **COMMON)
    module = ToyModule()
    trainer(tmp_path, max_steps=2, callbacks=[pruning]).fit(module, DataLoader(make_batches(2), batch_size=None))
    masks = {n: m.clone() for n, m in pruning.kept_masks.items()}
    copy = pickle.loads(pickle.dumps(pruning))
    assert copy.keeper is None and copy.measured_sparsity() == pruning.measured_sparsity()
    assert all(torch.equal(copy.kept_masks[n], masks[n]) for n in masks)
    module.calibration_calls = 0
    trainer(tmp_path, max_steps=2, callbacks=[copy]).fit(module, DataLoader(make_batches(2), batch_size=None))
    assert module.calibration_calls == 0 and all(torch.equal(copy.kept_masks[n], masks[n]) for n in masks)
    assert copy.result is not None and copy.result.target_sparsity == 0.6
    fresh, other = ToyModule(seed=7), pickle.loads(pickle.dumps(pruning))
    trainer(tmp_path, max_steps=1, callbacks=[other]).fit(fresh, DataLoader(make_batches(1), batch_size=None))
    assert fresh.calibration_calls == 2 and zero_where_pruned(other, fresh)
