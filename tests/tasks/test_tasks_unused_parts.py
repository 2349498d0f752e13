"""Every trainable parameter of each task gets a gradient, so plain DDP (no unused-parameter search) works."""
import lightning.pytorch as pl
import pytest

from blip_task_fixtures import ANSWERS, TINY_BACKBONE, caption_loaders, make_tokenizer, retrieval_loaders, trainer_kwargs, vqa_loaders
from mflightning.tasks import CaptioningModule, RetrievalModule, VQAModule


class MissingGradients(pl.Callback):
    def __init__(self):
        self.missing = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.missing = [n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("cls,loaders", [(RetrievalModule, retrieval_loaders), (CaptioningModule, caption_loaders),
                                         (VQAModule, vqa_loaders)])
def test_trainable_parameters_all_receive_gradients(tmp_path, cls, loaders):
    tokenizer = make_tokenizer(tmp_path)
    extra = {"answer_list": ANSWERS} if cls is VQAModule else {}
    module = cls(backbone=TINY_BACKBONE, tokenizer=tokenizer, **extra)
    probe = MissingGradients()
    train, _ = loaders(tokenizer)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[probe], max_steps=1, limit_val_batches=0)).fit(module, train)
    assert probe.missing == []
    frozen = {n.split(".")[1] for n, p in module.named_parameters() if not p.requires_grad}
    assert frozen == {part.split(".")[0] for part in cls.unused_parts}
