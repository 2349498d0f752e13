"""Prune once and fine-tune a tiny ViT classifier with MultiFlowCallback on 2 CPU processes (DDP, gloo); rank 0
prints what the test checks as JSON: the masks' file, the weights' sparsity, and validation top-1 against a
by-hand count over the whole evaluation split.

Run as a script (DDP re-executes this command per rank): python ddp_classification_script.py WORKDIR
"""
import json
import os
import sys

import lightning.pytorch as pl
import torch

from mflightning import MultiFlowCallback
from mflightning.data import ImageClassificationDataModule, ImageFolderCalibration
from mflightning.tasks import ImageClassificationModule

SIZE = 16
BACKBONE = dict(family="vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=SIZE, patch_size=8)


def datamodule(workdir: str) -> ImageClassificationDataModule:
    calibration = ImageFolderCalibration(image_root=os.path.join(workdir, "imagenet", "train"), image_size=SIZE,
                                         batch_size=2)
    return ImageClassificationDataModule(workdir, image_size=SIZE, resize_size=SIZE, batch_size=2, eval_batch_size=2,
                                         num_workers=0, calibration=calibration)


def module() -> ImageClassificationModule:
    torch.manual_seed(0)
    return ImageClassificationModule(BACKBONE, num_classes=3, lr=1e-3)


def main(workdir: str) -> None:
    dm, model = datamodule(workdir), module()
    masks = os.path.join(workdir, "masks.safetensors")
    callback = MultiFlowCallback(0.7, save_masks=masks)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, callbacks=[callback],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=workdir)
    trainer.fit(model, datamodule=dm)
    if trainer.is_global_zero:
        params = dict(model.named_parameters())
        zero = sum(int((params[n].detach()[~m] == 0).sum()) for n, m in callback.kept_masks.items())
        pruned = sum(int((~m).sum()) for m in callback.kept_masks.values())
        total = sum(m.numel() for m in callback.kept_masks.values())
        model.eval()
        with torch.no_grad():
            test = dm.dataset("test")
            hits = sum(int(model(item["image"][None]).argmax(1).item() == item["label"]) for item in test)
        out = {"masks": masks, "pruned": pruned, "zero": zero, "total": total,
               "val_top1": float(trainer.callback_metrics["val/top1"]), "by_hand": hits / len(test)}
        print("RESULT:" + json.dumps(out), flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
