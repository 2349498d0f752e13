"""`python -m mflightning.bench core`: what MultiFlowCallback costs on a BLIP-shaped model.

Figures (written as JSON and printed as a markdown table):
- calibration wall time / plain forward over the same batches (hooks + statistics overhead);
- time to compute all masks from collected statistics (scores + Eq. 7-8 allocation);
- training step time with MultiFlowCallback / dense, and with Lightning's ModelPruning
  (L1, global, unstructured) / dense, on the same model and data;
- extra memory per prunable weight held by each pruning method (tensor storage accounting).
Timings are medians over repeats; ratios are computed within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from mflightning.pruning import collect_input_norms, compute_masks, find_targets, resolve_modalities
from mflightning.pruning.scores import magnitude_scores, multiflow_scores

from .shapes import BLIP_GROUPS, HEADS, SHAPES, BlipShapedModule, make_batch


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tensor_bytes(*objects: Any) -> int:
    """Bytes of the distinct tensor storages reachable from modules (params, buffers, attributes) and dicts."""
    seen: set[int] = set()
    total = 0

    def visit(t: torch.Tensor) -> None:
        nonlocal total
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and storage.nbytes():
            seen.add(key)
            total += storage.nbytes()

    for obj in objects:
        if isinstance(obj, nn.Module):
            for module in obj.modules():
                for value in list(module._parameters.values()) + list(module._buffers.values()):
                    if value is not None:
                        visit(value)
                for value in module.__dict__.values():
                    if isinstance(value, torch.Tensor):
                        visit(value)
        elif isinstance(obj, dict):
            for value in obj.values():
                if isinstance(value, torch.Tensor):
                    visit(value)
    return total


class StepTimer(L.Callback):
    """Wall time of each training step (batch start to batch end, optimizer step included).

    On a CUDA device it synchronises at both ends, so a step's time is its device time, and it
    records the peak memory allocated over the timed steps."""

    def __init__(self, skip: int):
        self.skip = skip
        self.times: list[float] = []
        self.timing = False
        self._start = 0.0
        self.cuda = False
        self.peak_bytes: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.cuda = pl_module.device.type == "cuda"
        self.timing = trainer.global_step >= self.skip  # this step will be recorded
        if self.cuda:
            torch.cuda.synchronize()
            if trainer.global_step == self.skip:
                torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        if trainer.global_step > self.skip:
            self.times.append(time.perf_counter() - self._start)
            self.peak_bytes = peak_memory_bytes(pl_module.device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory: CUDA's allocator high-water mark since its last reset, else this process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class PruneWithModelPruningAtStart(L.Callback):
    """Apply Lightning's ModelPruning once before training so every timed step runs with its masks."""

    def __init__(self, pruning: Any, amount: float):
        self.pruning = pruning
        self.amount = amount

    def on_fit_start(self, trainer, pl_module) -> None:
        self.pruning.apply_pruning(self.amount)


def time_training(shape_name: str, batch_size: int, steps: int, warmup: int, mode: str, sparsity: float,
                  accelerator: str = "cpu", precision: str = "32-true") -> dict:
    """Median step time for one configuration (dense, multiflow masks, or ModelPruning), with the
    count of pruned weights that are not exactly zero after the last step (multiflow: must be 0)."""
    from lightning.pytorch.callbacks import ModelPruning

    from mflightning import MultiFlowCallback

    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    module = BlipShapedModule(shape)
    batches = [make_batch(shape, batch_size, seed=i) for i in range(steps + warmup)]
    timer = StepTimer(skip=warmup)
    callbacks: list[L.Callback] = [timer]
    dense_bytes = tensor_bytes(module)
    holder: dict[str, Any] = {}
    hook_seconds = [0.0]
    if mode == "multiflow":
        pruning = MultiFlowCallback(sparsity, calibration=batches[:2], modalities=BLIP_GROUPS, exclude=HEADS)
        _time_calls(pruning, ("on_before_optimizer_step", "_after_step"), hook_seconds, timer, sync=accelerator in ("gpu", "cuda"))
        callbacks.insert(0, pruning)
        holder["callback"] = pruning
    elif mode == "modelpruning":
        targets = find_targets(module, resolve_modalities(module, BLIP_GROUPS, HEADS))
        owners = {id(t.param): t.modules[0] for t in targets.values()}
        parameters = [(owners[id(t.param)], "weight") for t in targets.values()]
        pruning = ModelPruning(
            "l1_unstructured", parameters_to_prune=parameters, amount=lambda epoch: 0,
            use_global_unstructured=True, use_lottery_ticket_hypothesis=False, make_pruning_permanent=False, verbose=0,
        )
        callbacks = [pruning, PruneWithModelPruningAtStart(pruning, sparsity), timer]
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_steps=steps + warmup, logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    checkpoint_bytes = _checkpoint_size(trainer)
    prunable = sum(t.param.numel() for t in find_targets(module, resolve_modalities(module, BLIP_GROUPS, HEADS)).values()) \
        if mode != "modelpruning" else None
    pruned_nonzero = None
    if mode == "multiflow":
        extra = tensor_bytes(module, holder["callback"].kept_masks) - tensor_bytes(module)
        prunable = sum(m.numel() for m in holder["callback"].kept_masks.values())
        params = dict(module.named_parameters())
        # counted on the device the weights live on (a GPU's tensors, not a copy)
        pruned_nonzero = sum(int((params[n].detach()[~kept] != 0).sum()) for n, kept in holder["callback"].kept_masks.items())
    elif mode == "modelpruning":
        extra = tensor_bytes(module) - dense_bytes
        prunable = sum(b.numel() for n, b in module.named_buffers() if n.endswith("weight_mask"))
    else:
        extra = 0
    return {
        "median_step_s": statistics.median(timer.times),
        # time inside the callback's two per-step hooks (grad and weight masking), per timed step
        "mask_hooks_s_per_step": hook_seconds[0] / max(1, len(timer.times)),
        "steps_timed": len(timer.times),
        "extra_bytes": extra,
        "extra_bytes_per_prunable_weight": extra / prunable if prunable else 0.0,
        "prunable_weights": prunable,
        "checkpoint_bytes": checkpoint_bytes,
        "pruned_nonzero": pruned_nonzero,
        "peak_memory_bytes": timer.peak_bytes,
    }


def _time_calls(obj: Any, names: tuple[str, ...], total: list[float], timer: "StepTimer", sync: bool = False) -> None:
    """Wrap `obj`'s methods so the seconds they take during timed steps add up in `total[0]`
    (`sync`: CUDA-synchronised at both ends, so the time is the device work the call launched)."""
    for name in names:
        method = getattr(obj, name)

        def timed(*args: Any, _method: Callable = method) -> Any:
            if sync:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = _method(*args)
            if sync:
                torch.cuda.synchronize()
            if timer.timing:
                total[0] += time.perf_counter() - start
            return out

        setattr(obj, name, timed)


def _checkpoint_size(trainer: L.Trainer) -> int:
    """Size of a full Lightning checkpoint (weights, optimizer state, callback state) of this run."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.ckpt"
        trainer.save_checkpoint(path)
        return path.stat().st_size


def calibration_figures(shape_name: str, batch_size: int, num_batches: int, repeats: int, sparsity: float) -> dict:
    """Calibration overhead against a plain no-grad forward, and mask computation time."""
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    module = BlipShapedModule(shape)
    model = module.model.eval()
    batches = [make_batch(shape, batch_size, seed=100 + i) for i in range(num_batches)]
    targets = find_targets(model, resolve_modalities(model, BLIP_GROUPS, HEADS))

    def forward(m: nn.Module, batch: dict) -> None:
        m(batch["image"], batch["input_ids"], batch["attention_mask"])

    def plain() -> None:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)

    holder: dict[str, Any] = {}

    def calibrate() -> None:
        holder["stats"] = collect_input_norms(model, targets, batches, forward=forward)

    plain()  # warm-up (allocator, kernels)
    plain_s, calib_s = [], []
    for _ in range(repeats):  # interleaved, so machine load affects both alike
        plain_s.append(_median_time(plain, 1))
        calib_s.append(_median_time(calibrate, 1))
    stats = holder["stats"]
    groups = {name: t.group for name, t in targets.items()}

    def masks() -> None:
        norms = {name: stats.sums[name].sqrt() for name in targets}
        scores = {name: multiflow_scores(t.param, norms[name]) for name, t in targets.items()}
        magnitudes = {name: magnitude_scores(t.param) for name, t in targets.items()}
        holder["masks"] = compute_masks(scores, sparsity, "modality", groups=groups, magnitudes=magnitudes)

    mask_s = _median_time(masks, max(1, repeats // 2))
    kept = sum(int(m.sum()) for m in holder["masks"].values())
    total = sum(m.numel() for m in holder["masks"].values())
    return {
        "prunable_weights": total,
        "calibration_batches": num_batches,
        "batch_size": batch_size,
        "plain_forward_s": statistics.median(plain_s),
        "calibration_s": statistics.median(calib_s),
        "calibration_over_forward": statistics.median(c / p for c, p in zip(calib_s, plain_s)),
        "mask_computation_s": mask_s,
        "realised_sparsity": 1 - kept / total,
    }


def _isolated(fn: Callable[..., dict], args: tuple) -> dict:
    """Run one measurement in a fresh process: a base-size model, its optimizer state and the
    allocator's high-water mark are all returned to the OS before the next configuration starts."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the isolated worker processes
    report: dict[str, Any] = {
        "benchmark": "core",
        "shape": args.shape,
        "sparsity": args.sparsity,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": L.__version__,
    }
    job = (args.shape, args.batch_size, args.calib_batches, args.repeats, args.sparsity)
    report["calibration"] = _isolated(calibration_figures, job) if args.isolate else calibration_figures(*job)
    modes = ("dense", "multiflow", "modelpruning")
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):  # interleaved rounds, so background load hits every mode alike
        for mode in modes:
            job = (args.shape, args.batch_size, args.steps, args.warmup, mode, args.sparsity)
            runs[mode].append(_isolated(time_training, job) if args.isolate else time_training(*job))
    training: dict[str, Any] = {}
    for mode in modes:
        training[mode] = dict(runs[mode][-1])
        training[mode]["median_step_s"] = statistics.median(r["median_step_s"] for r in runs[mode])
        training[mode]["round_medians_s"] = [r["median_step_s"] for r in runs[mode]]
    dense = training["dense"]["median_step_s"]
    training["multiflow_over_dense"] = training["multiflow"]["median_step_s"] / dense
    training["modelpruning_over_dense"] = training["modelpruning"]["median_step_s"] / dense
    report["training"] = training
    return report


def markdown(report: dict) -> str:
    c, t = report["calibration"], report["training"]
    rows = [
        f"Core benchmark: `{report['shape']}` BLIP shapes, {c['prunable_weights']:,} prunable weights, "
        f"sparsity {report['sparsity']}, {report['device']} ({report['torch_threads']} threads)",
        "",
        "| figure | MultiFlowCallback | Lightning ModelPruning |",
        "|---|---|---|",
        f"| calibration / plain forward ({c['calibration_batches']} batches of {c['batch_size']}) | "
        f"{c['calibration_over_forward']:.3f} | - |",
        f"| mask computation from statistics (s) | {c['mask_computation_s']:.2f} | - |",
        f"| training step / dense step | {t['multiflow_over_dense']:.3f} | {t['modelpruning_over_dense']:.3f} |",
        f"| median step (s), dense {t['dense']['median_step_s']:.3f} | {t['multiflow']['median_step_s']:.3f} | "
        f"{t['modelpruning']['median_step_s']:.3f} |",
        f"| mask hooks per step / dense step | {t['multiflow']['mask_hooks_s_per_step'] / t['dense']['median_step_s']:.3f} | - |",
        f"| extra memory per prunable weight (bytes) | {t['multiflow']['extra_bytes_per_prunable_weight']:.2f} | "
        f"{t['modelpruning']['extra_bytes_per_prunable_weight']:.2f} |",
        f"| checkpoint size / dense checkpoint | {t['multiflow']['checkpoint_bytes'] / t['dense']['checkpoint_bytes']:.3f} | "
        f"{t['modelpruning']['checkpoint_bytes'] / t['dense']['checkpoint_bytes']:.3f} |",
    ]
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="base", help="model size (base = BLIP-base, ~200M prunable)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="calibration timing repeats")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the three training runs")
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="run every configuration in this process (faster start, memory accumulates)")
    parser.add_argument("--output", type=Path, default=Path("outputs/bench/core.json"))


def write_report(report: dict, table: str, output: Path) -> None:
    """The JSON next to its markdown table (same name, .md), and the table on stdout."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    output.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwritten: {output} and {output.with_suffix('.md')}")


def main(args: argparse.Namespace) -> dict:
    report = run(args)
    write_report(report, markdown(report), args.output)
    return report
