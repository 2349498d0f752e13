"""The multi-process parts of `bench gpu`, started by it as `python -m mflightning.bench.gpu_multi MODE OUT ...`.

MODE `single` (one process: the reference), `ddp` (DDPStrategy; NCCL on GPUs, gloo on CPU) or `fsdp2`
(ModelParallelStrategy, every encoder block and then the root `fully_shard`-ed). Each run calibrates
MultiFlowCallback on the same batches of the BLIP-shaped model, trains a few steps checking after every
step that each rank's pruned entries are exactly zero, and saves per rank what `compare` checks: the full
masks, those checks and the number of calibration forwards. `fsdp2` then resumes from its last checkpoint,
which must restore the masks without calibrating.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from .shapes import BLIP_GROUPS, HEADS, SHAPES, BlipShapedModule, make_batch

CALIBRATION_BATCHES = 6
TRAIN_STEPS = 3


class CountingModule(BlipShapedModule):
    """Counts calibration forwards, so a resume that recalibrates is seen."""

    def __init__(self, shape, sharded: bool = False):
        super().__init__(shape)
        self.calibration_calls = 0
        self.sharded = sharded

    def calibration_step(self, batch: dict) -> None:
        self.calibration_calls += 1
        super().calibration_step(batch)

    def configure_model(self) -> None:
        if not self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in (*self.model.vision.encoder.layers, *self.model.text.encoder.layer):
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


class ZeroProbe(L.Callback):
    """After every training batch: are this rank's pruned entries (its shards under FSDP2) exactly zero?"""

    def __init__(self, pruning):
        self.pruning = pruning
        self.checks: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        params = dict(pl_module.named_parameters())
        ok = True
        for name, kept in self.pruning.kept_masks.items():
            weight = params[name].detach()
            weight = weight.to_local() if hasattr(weight, "to_local") else weight
            ok = ok and bool((weight[~kept.to(weight.device)] == 0).all())
        self.checks.append(ok)


def _strategy(mode: str, processes: int):
    if mode == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=processes, tensor_parallel_size=1)
    return "ddp" if mode == "ddp" else "auto"


def fit(args: argparse.Namespace, ckpt_path: Path | None = None) -> tuple[L.Trainer, dict]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mflightning import MultiFlowCallback

    shape = SHAPES[args.shape]
    calibration = [make_batch(shape, 4, seed=100 + i) for i in range(CALIBRATION_BATCHES)]
    pruning = MultiFlowCallback(0.75, calibration=calibration, modalities=BLIP_GROUPS, exclude=HEADS)
    probe = ZeroProbe(pruning)
    checkpoint = ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True)
    trainer = L.Trainer(
        accelerator="cuda" if args.device == "cuda" else "cpu", devices=args.processes, strategy=_strategy(args.mode, args.processes),
        precision=args.precision, max_steps=TRAIN_STEPS if ckpt_path is None else TRAIN_STEPS + 2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning, probe, checkpoint],
    )
    torch.manual_seed(0)
    module = CountingModule(shape, sharded=args.mode == "fsdp2")
    data = DataLoader([make_batch(shape, 4, seed=i) for i in range(TRAIN_STEPS + 2)], batch_size=None)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    masks = pruning.keeper.full_masks() if args.mode == "fsdp2" else pruning.kept_masks
    return trainer, {
        "masks": {n: m.cpu() for n, m in masks.items()},
        "checks": probe.checks,
        "calibration_calls": module.calibration_calls,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mflightning.bench.gpu_multi")
    parser.add_argument("mode", choices=("single", "ddp", "fsdp2"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="base")
    parser.add_argument("--precision", default="bf16-mixed")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    trainer, first = fit(args)
    report = {"first": first}
    if args.mode == "fsdp2":
        _, report["resumed"] = fit(args, ckpt_path=args.out / "ckpt" / "last.ckpt")
    torch.save(report, args.out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def compare(single: Path, multi: Path, world: int) -> dict:
    """What the multi-process run shows against the one-process reference."""
    reference = torch.load(single / "rank0.pt")["first"]["masks"]
    ranks = [torch.load(multi / f"rank{r}.pt") for r in range(world)]
    firsts = [r["first"] for r in ranks]
    names = sorted(reference)
    identical = all(sorted(f["masks"]) == names and all(torch.equal(f["masks"][n], firsts[0]["masks"][n]) for n in names)
                    for f in firsts)
    differing = sum(int((firsts[0]["masks"][n] != reference[n]).sum()) for n in names)
    out = {
        "processes": world,
        "masks_identical_across_ranks": identical,
        "mask_entries": sum(reference[n].numel() for n in names),
        "entries_differing_from_one_process": differing,
        "pruned_zero_after_every_step": all(all(f["checks"]) and f["checks"] for f in firsts),
        "calibration_forwards_per_rank": [f["calibration_calls"] for f in firsts],
    }
    if "resumed" in ranks[0]:
        resumed = [r["resumed"] for r in ranks]
        out["resume_restored_masks"] = all(
            all(torch.equal(r["masks"][n], firsts[0]["masks"][n]) for n in names) for r in resumed)
        out["resume_calibration_forwards"] = sum(r["calibration_calls"] for r in resumed)
        out["resume_pruned_zero_after_every_step"] = all(all(r["checks"]) and r["checks"] for r in resumed)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
