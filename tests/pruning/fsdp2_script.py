"""Run by test_fsdp2.py as a subprocess: MultiFlow under FSDP2 (ModelParallelStrategy, fully_shard) on CPU.

Usage: python fsdp2_script.py OUT_DIR {distributed,full}
Two processes calibrate, train and checkpoint; a second fit resumes from that checkpoint. Each rank
saves what the test checks: full masks (gathered), local mask/parameter sizes, zero checks after
every step, and calibration counts.
"""
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from toy_models import GROUPS, ToyModule, make_batches


class ShardedToy(ToyModule):
    """Each block sharded, then the root. `root_layers=True` leaves the text layers to the root's group:
    a forward without backward (calibration, validation) leaves those unsharded, the layout that crashed
    at train end (issue 22, item 1)."""

    def __init__(self, seed: int = 0, root_layers: bool = False, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.root_layers = root_layers

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        blocks = (self.model.vision, self.model.head)
        for part in blocks if self.root_layers else (*blocks, *self.model.text.values()):
            fully_shard(part, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def validation_step(self, batch, batch_idx):
        self.model(**{k: batch[k] for k in ("image", "input_ids", "attention_mask")})


class ZeroProbe(L.Callback):
    """After every training batch: are the pruned entries of every local shard exactly zero?"""

    def __init__(self, pruning):
        self.pruning = pruning
        self.checks = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        ok = all((params[n].to_local().detach()[~kept] == 0).all() for n, kept in self.pruning.kept_masks.items())
        self.checks.append(bool(ok))


def fit(out: Path, mode: str, seed: int, ckpt_path=None):
    from mflightning import MultiFlowCallback

    pruning = MultiFlowCallback(0.7, calibration=make_batches(5, seed=3), modalities=GROUPS, exclude=[r"head\."])
    probe = ZeroProbe(pruning)
    checkpoint = ModelCheckpoint(dirpath=out / f"ckpt-{mode}", save_last=True)
    root_layers = mode == "full"  # the two checkpoint layouts also cover the two shardings
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=3 if ckpt_path is None else 6, limit_val_batches=1,
        val_check_interval=3 if root_layers else None, num_sanity_val_steps=0,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                       save_distributed_checkpoint=(mode == "distributed")),
        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning, probe, checkpoint],
    )
    module = ShardedToy(seed=seed, root_layers=root_layers)
    val = DataLoader(make_batches(1), batch_size=None) if root_layers else None
    trainer.fit(module, DataLoader(make_batches(6), batch_size=None), val, ckpt_path=ckpt_path)
    params = dict(module.named_parameters())
    full = pruning.keeper.full_masks()  # gathered: a collective on every rank
    report = {
        "masks": full,
        "local_mask_numel": {n: m.numel() for n, m in pruning.kept_masks.items()},
        "local_param_numel": {n: params[n].to_local().numel() for n in pruning.kept_masks},
        "mask_dtypes": {str(m.dtype) for m in pruning.kept_masks.values()},
        "checks": probe.checks,
        "calibration_calls": module.calibration_calls,
        "sparsity": pruning.measured_sparsity(reduce=lambda t: trainer.strategy.reduce(t, reduce_op="sum"))["total"],
        "default_sparsity": pruning.measured_sparsity(),  # summed over ranks without being asked
        "sharded": sorted(n for n, p in pruning.keeper.params.items() if type(p).__name__ == "DTensor"),
    }
    return trainer, report


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    trainer, first = fit(out, mode, seed=0)
    _, resumed = fit(out, mode, seed=5, ckpt_path=out / f"ckpt-{mode}" / "last.ckpt")
    torch.save({"first": first, "resumed": resumed}, out / f"fsdp2-{mode}-rank{trainer.global_rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
