"""Run by test_weight_updating.py as a subprocess: SparseGPT and CHITA++ through the callback under CPU
DDP, and SparseGPT under FSDP2 (ModelParallelStrategy, fully_shard).

Usage: python weight_updating_ddp_script.py OUT_DIR DEVICES
Saves each rank's masks, the module's (gathered) weights after a fit at lr=0 and the calibration info.
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

    from lightning.pytorch.strategies import ModelParallelStrategy

    from fsdp2_script import ShardedToy

    saved = {}
    for run in ("sparsegpt", "chita++", "sparsegpt-fsdp2"):
        method = run.split("-")[0]
        callback = MultiFlowCallback(0.6, method=method, calibration=make_batches(5, seed=3), loss=loss, rounds=2,
                                     modalities=GROUPS, exclude=[r"head\."])
        fsdp2 = run.endswith("fsdp2")
        module = (ShardedToy if fsdp2 else ToyModule)(lr=0.0, weight_decay=0.0)
        strategy = "ddp" if devices > 1 else "auto"
        if fsdp2:
            strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
        trainer = L.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy, max_steps=2,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[callback],
        )
        trainer.fit(module, DataLoader(make_batches(4), batch_size=None))
        params = dict(module.named_parameters())
        saved[run] = {
            "masks": callback.keeper.full_masks(),
            "weights": {n: (p.full_tensor() if fsdp2 else p).detach().clone() for n, p in params.items()
                        if n in callback.kept_masks},
            "calibration": callback.result.calibration,
            "calls": module.calibration_calls,
        }
    torch.save(saved, out / f"{devices}-rank{trainer.global_rank}.pt")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
