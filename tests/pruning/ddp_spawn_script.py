"""Run by test_core_ddp.py as a subprocess: a `ddp_spawn` fit (two CPU workers), then a second fit of
the returned module in the launching process.

Usage: python ddp_spawn_script.py OUT_DIR
The workers are spawned processes holding pickled copies of the callback and module; the launching
process saves what it knows afterwards: the callback's figures and masks, and the returned weights.
"""
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from toy_models import GROUPS, ToyModule, make_batches


class ReleaseProcessGroup(L.Callback):
    """At the end of a worker's fit, both ranks leave together and destroy the gloo group. Lightning's spawn
    workers exit with it alive (rank 1 right away, while rank 0 still saves the weights), and a gloo group torn
    down at interpreter exit now and then aborts the process ("terminate called without an active exception")."""

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def fit(pruning, module, **spawn) -> dict:
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, **spawn,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[pruning, ReleaseProcessGroup()])
    trainer.fit(module, DataLoader(make_batches(4), batch_size=None))
    params = dict(module.named_parameters())
    masks = {n: m.clone() for n, m in pruning.kept_masks.items()}
    return {
        "figures": pruning.measured_sparsity(),
        "masks": masks,
        "zeros_where_pruned": all(bool((params[n].detach()[~kept] == 0).all()) for n, kept in masks.items()),
        "weight_zeros": sum(int((params[n] == 0).sum()) for n in masks) / sum(params[n].numel() for n in masks),
    }


def main() -> None:
    from mflightning import MultiFlowCallback

    out = Path(sys.argv[1])
    pruning = MultiFlowCallback(0.6, calibration=make_batches(4, seed=3), modalities=GROUPS, exclude=[r"head\."])
    module = ToyModule()
    first = fit(pruning, module, devices=2, strategy="ddp_spawn")
    pruning.calibration = make_batches(4, seed=11)  # a recalibration would give other masks
    second = fit(pruning, module, devices=1)  # in the launching process: a third spawn costs ~20 s of imports
    torch.save({"first": first, "second": second}, out / "spawn.pt")


if __name__ == "__main__":
    main()
