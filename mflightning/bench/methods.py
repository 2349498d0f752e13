"""`python -m mflightning.bench methods`: each pruning method's cost (the paper's Table 7), as ratios to MultiFlow.

For every method, in a fresh process on the same BLIP-shaped model and the same calibration
batches: the wall time of `prune()` (calibration, scores, masks and, for SparseGPT and CHITA, the
weight updates) and its peak extra memory (the process's peak resident memory above what the model
and batches hold; on CUDA, peak allocated memory). The paper reports MultiFlow 41x faster than
CHITA++ on average (its Table 7, 60 rounds of 50 batches of 32 at BLIP/XVLM size on a GPU).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core import _isolated, write_report
from .shapes import BLIP_GROUPS, HEADS, SHAPES, BlipShaped, make_batch

METHODS = ("multiflow", "omp", "wanda", "snip", "sparsegpt", "chita", "chita++")
PAPER_CHITA_PP_OVER_MULTIFLOW = 41  # Sec. 6.1 / Table 7: MultiFlow 41x faster than CHITA++ on average


def _rss(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    """Reset the process's peak resident memory (Linux: write 5 to clear_refs); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _release_freed_memory() -> None:
    """glibc's malloc_trim(0): freed heap memory is returned to the OS (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(method: str, shape_name: str, batch_size: int, num_batches: int, rounds: int, sparsity: float,
            device: str, threads: int) -> dict:
    """One method's pruning time and peak extra memory (run in its own process)."""
    if threads:
        torch.set_num_threads(threads)
    from mflightning.pruning import prune

    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    model = BlipShaped(shape).to(device)
    batches = [make_batch(shape, batch_size, seed=100 + i) for i in range(num_batches)]

    def forward(m: nn.Module, batch: dict) -> Any:
        return m(batch["image"], batch["input_ids"], batch["attention_mask"])

    def loss(m: nn.Module, batch: dict) -> torch.Tensor:  # ITM cross-entropy, as the calibration loss
        return nn.functional.cross_entropy(forward(m, batch).float(), batch["label"])

    settings = dict(sparsity=sparsity, method=method, modalities=BLIP_GROUPS, exclude=list(HEADS), rounds=rounds)
    with warnings.catch_warnings():  # random weights: nearly-empty-layer warnings say nothing here
        warnings.simplefilter("ignore")
        for warm_up in ("multiflow", "snip"):  # first forward and backward: thread pools, allocator, autograd
            prune(model, calibration=batches[:1], forward=forward, loss=loss, **{**settings, "method": warm_up})
    _release_freed_memory()  # what the warm-up freed goes back to the OS, so reuse cannot hide a peak
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    resettable = _reset_peak()
    base_rss = _rss("VmRSS")
    start = time.perf_counter()
    result = prune(model, calibration=batches, forward=forward, loss=loss, keep_scores=False, **settings)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if cuda else _rss("VmHWM") - base_rss
    return {
        "method": method,
        "seconds": seconds,
        "peak_extra_bytes": peak,
        "peak_measured": "cuda max_memory_allocated" if cuda else ("VmHWM" if resettable else "VmHWM (not reset)"),
        "prunable_weights": sum(m.numel() for m in result.masks.values()),
        "realised_sparsity": result.sparsity,
        "carries_weights": result.weights is not None,
    }


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    report: dict[str, Any] = {
        "benchmark": "methods", "shape": args.shape, "sparsity": args.sparsity, "device": args.device,
        "batch_size": args.batch_size, "calibration_batches": args.calib_batches, "rounds": args.rounds_chita,
        "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
        "paper_chita_pp_over_multiflow": PAPER_CHITA_PP_OVER_MULTIFLOW,
    }
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for _ in range(args.repeats):  # interleaved, so background load hits every method alike
        for method in args.methods:
            job = (method, args.shape, args.batch_size, args.calib_batches, args.rounds_chita, args.sparsity,
                   args.device, args.threads)
            runs[method].append(_isolated(measure, job) if args.isolate else measure(*job))
    methods = {}
    for method, results in runs.items():
        methods[method] = dict(results[-1])
        methods[method]["seconds"] = statistics.median(r["seconds"] for r in results)
        methods[method]["all_seconds"] = [r["seconds"] for r in results]
        methods[method]["peak_extra_bytes"] = max(r["peak_extra_bytes"] for r in results)
    if "multiflow" in methods:
        reference = methods["multiflow"]
        for entry in methods.values():
            entry["time_over_multiflow"] = entry["seconds"] / reference["seconds"]
            entry["memory_over_multiflow"] = entry["peak_extra_bytes"] / max(reference["peak_extra_bytes"], 1)
    report["methods"] = methods
    return report


def markdown(report: dict) -> str:
    methods = report["methods"]
    first = next(iter(methods.values()))
    rows = [
        f"Pruning cost: `{report['shape']}` BLIP shapes, {first['prunable_weights']:,} prunable weights, sparsity "
        f"{report['sparsity']}, {report['calibration_batches']} calibration batches of {report['batch_size']} "
        f"(CHITA++: {report['rounds']} rounds over them), {report['device']} ({report['threads']} threads)",
        "",
        "| method | pruning time (s) | time / MultiFlow | peak extra memory (MiB) | memory / MultiFlow | updates weights |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        rows.append(
            f"| {name} | {m['seconds']:.2f} | {m.get('time_over_multiflow', float('nan')):.2f} | "
            f"{m['peak_extra_bytes'] / 2**20:.1f} | {m.get('memory_over_multiflow', float('nan')):.2f} | "
            f"{'yes' if m['carries_weights'] else 'no'} |"
        )
    rows += ["", f"The paper (Sec. 6.1, Table 7): CHITA++ takes {report['paper_chita_pp_over_multiflow']}x MultiFlow's "
             "time on average (60 rounds of 50 batches of 32, BLIP/XVLM, GPU)."]
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="base", help="model size (base = BLIP-base, ~200M prunable)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"default: {' '.join(METHODS)}")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calib-batches", type=int, default=4, help="the same calibration batches for every method")
    parser.add_argument("--rounds-chita", type=int, default=2, help="CHITA++ rounds (the batches are split over them)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats (median time, max memory)")
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="every method in this process (memory figures then include earlier methods' leftovers)")
    parser.add_argument("--output", type=Path, default=Path("outputs/bench/methods.json"))


def main(args: argparse.Namespace) -> dict:
    report = run(args)
    write_report(report, markdown(report), args.output)
    return report
