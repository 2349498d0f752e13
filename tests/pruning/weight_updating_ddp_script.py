"""Run by test_weight_updating.py as a subprocess: SparseGPT and CHITA++ through the callback under CPU DDP.

Usage: python weight_updating_ddp_script.py OUT_DIR DEVICES
Saves each rank's masks, the module's weights after a fit at lr=0 and the calibration info.
"""
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from toy_models import GROUPS, ToyModule, make_batches, model_inputs


def loss(module, batch):
    return nn.functional.cross_entropy(module.model(**model_inputs(batch)), batch["label"])


def main() -> None:
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    from mflightning import MultiFlowCallback

    saved = {}
    for method in ("sparsegpt", "chita++"):
        callback = MultiFlowCallback(0.6, method=method, calibration=make_batches(5, seed=3), loss=loss, rounds=2,
                                     modalities=GROUPS, exclude=[r"head\."])
        module = ToyModule(lr=0.0, weight_decay=0.0)
        trainer = L.Trainer(
            accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=2,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[callback],
        )
        trainer.fit(module, DataLoader(make_batches(4), batch_size=None))
        saved[method] = {
            "masks": callback.kept_masks,
            "weights": {n: p.detach().clone() for n, p in module.named_parameters() if n in callback.kept_masks},
            "calibration": callback.result.calibration,
            "calls": module.calibration_calls,
        }
    torch.save(saved, out / f"{devices}-rank{trainer.global_rank}.pt")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
