"""Run by test_core_ddp.py as a subprocess: calibrate + train under CPU DDP, save each rank's masks.

Usage: python ddp_calibration_script.py OUT_DIR DEVICES {loader,list,sampler}
"""
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from toy_models import GROUPS, ToyModule, make_batches


def samples(n_batches: int) -> list[dict]:
    """The same batches as make_batches, split into single samples for a map-style DataLoader."""
    out = []
    for batch in make_batches(n_batches, seed=3):
        for i in range(batch["label"].shape[0]):
            out.append({k: v[i] for k, v in batch.items()})
    return out


def main() -> None:
    out, devices, kind = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    from mflightning import MultiFlowCallback

    if kind == "loader":
        calibration = DataLoader(samples(5), batch_size=4, shuffle=False)
    elif kind == "sampler":  # already sharded by the user: each rank loads its half of the samples
        import os

        from torch.utils.data import DistributedSampler

        rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning's launcher for the second process
        sampler = DistributedSampler(samples(5), num_replicas=devices, rank=rank, shuffle=False)
        calibration = DataLoader(samples(5), batch_size=4, sampler=sampler)
    else:
        calibration = make_batches(5, seed=3)
    callback = MultiFlowCallback(0.7, calibration=calibration, modalities=GROUPS, exclude=[r"head\."])
    module = ToyModule()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=3,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, DataLoader(make_batches(6), batch_size=None))
    assert callback.kept_masks, "the callback pruned nothing"
    zeros = all((p.detach()[~callback.kept_masks[n]] == 0).all() for n, p in module.named_parameters()
                if n in callback.kept_masks)
    torch.save(
        {"masks": callback.kept_masks, "calibration_calls": module.calibration_calls, "zeros": bool(zeros)},
        out / f"{kind}-{devices}-rank{trainer.global_rank}.pt",
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # not left to exit-time destructors (gloo aborts seen)


if __name__ == "__main__":
    main()
