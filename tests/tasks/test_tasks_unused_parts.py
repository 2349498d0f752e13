"""Every trainable parameter of each task gets a gradient, so plain DDP (no unused-parameter search) works;
what stays frozen is what the backbone names as the task's unused parts."""
import lightning.pytorch as pl
import pytest

from task_fixtures import FAMILIES, caption_loaders, make_tokenizer, retrieval_loaders, trainer_kwargs, vqa_loaders

LOADERS = {"retrieval": retrieval_loaders, "captioning": caption_loaders, "vqa": vqa_loaders}
CASES = [(family, task) for family in sorted(FAMILIES) for task in sorted(LOADERS)]


class MissingGradients(pl.Callback):
    def __init__(self):
        self.missing = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.missing = [n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("family,task", CASES)
def test_trainable_parameters_all_receive_gradients(tmp_path, family, task):
    tokenizer = make_tokenizer(tmp_path)
    module = FAMILIES[family].module(task, tokenizer)
    probe = MissingGradients()
    train, _ = LOADERS[task](tokenizer)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[probe], max_steps=1, limit_val_batches=0)).fit(module, train)
    assert probe.missing == []


# XVLMVQAModule once added its answer decoder after freezing, copying frozen MLM-head parameters into
# it; the decoder is now added first, so every case freezes exactly the backbone's unused parts.
@pytest.mark.parametrize("family,task", CASES)
def test_frozen_parameters_are_the_backbones_unused_parts(tmp_path, family, task):
    module = FAMILIES[family].module(task, make_tokenizer(tmp_path))
    parts = module.backbone.unused_parts(task)
    assert module.unused_parts == parts and parts
    frozen = {n for n, p in module.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in module.backbone.named_parameters()
                      if any(n == part or n.startswith(part + ".") for part in parts)}
