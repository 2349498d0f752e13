"""``SaveBackbone``: write a task module's backbone with ``save_pretrained`` when training ends, so a later
recipe can start from it (``backbone: {checkpoint: <dir>}``), e.g. XVLM's captioning-pretraining stage
(``recipes/xvlm/captioning_pretrain.yaml``), whose output the captioning recipe fine-tunes."""
from __future__ import annotations

import os

import lightning.pytorch as pl


class SaveBackbone(pl.Callback):
    """At the end of ``fit``, process 0 writes ``pl_module.backbone.save_pretrained(dirpath)`` (pruned weights
    are zeros there: the same mask file applies to the next stage); the other processes wait for it.

    Plain and DDP training only: a sharded backbone (FSDP) is not gathered here and is refused.
    """

    def __init__(self, dirpath: str):
        self.dirpath = os.fspath(dirpath)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        backbone = getattr(pl_module, "backbone", None)
        if backbone is None or not hasattr(backbone, "save_pretrained"):
            raise ValueError(f"SaveBackbone: {type(pl_module).__name__} holds no backbone with save_pretrained")
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "ModelParallel" in strategy:
            raise ValueError(f"SaveBackbone: the {strategy} shards the backbone; save it from a gathered state dict")
        if trainer.is_global_zero:
            backbone.save_pretrained(self.dirpath)
        trainer.strategy.barrier("SaveBackbone")
