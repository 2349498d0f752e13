"""`python -m mflightning.bench gpu`: the project's GPU claims, checked in one prepared run.

Device time is short when a GPU is lent, so this is one command that fits 10 minutes on one
H100-class GPU and writes one report (`outputs/bench/gpu.json` + `gpu.md`). Parts, in order:

  env          GPU model, driver, torch / CUDA / cuDNN / Lightning / transformers versions
  step         BLIP-base shapes in bf16-mixed: dense training step vs MultiFlowCallback vs Lightning's
               ModelPruning (interleaved rounds, medians), mask-hook time per step over the dense step
               (target <= 0.01), pruned weights counted non-zero on the GPU tensors after the steps
  calibration  image-text pairs per second through BLIP-base's calibration forward (image encoder,
               grounded encoder, decoder) at 224 and 384 px with fp32 statistics, and the time a
               3000 x (32 + 32) calibration (the authors' set) would take
  memory       peak GPU memory of calibration (vs a plain forward) and of a training step (dense vs pruned)
  speed        `bench speed`'s 2:4 table (dense bf16 vs semi-structured; CUDA only)
  ddp          2+ GPUs: DDP (NCCL) masks identical on every rank and equal to one process
  fsdp2        2+ GPUs: ModelParallelStrategy (per-block + root fully_shard): pruned entries zero after every
               step on every shard, masks equal to one process, a resume restores them without calibrating

Each part has a time budget; a part that would take the run past `--budget` is skipped with a note,
and a part that fails is recorded with its error while the others go on. `--only step calibration`
runs just those. Without CUDA it stops at once with a message and the plan it would run;
`--device cpu` runs the same logic on the CPU (how the test suite covers it; multi-process parts use
gloo there, `--processes`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .shapes import SHAPES, Shape

# The authors' calibration: 3000 steps, each one batch of 32 CC3M and one of 32 Visual Genome pairs.
AUTHORS_CALIBRATION_PAIRS = 3000 * (32 + 32)
# The figure the paper's authors give for one MultiFlow pruning run (quoted in the project's issue 27).
PAPER_CALIBRATION = "about 5 minutes on one GPU"
HOOK_TARGET = 0.01


@dataclass(frozen=True)
class Part:
    """One section of the report: `budget_s` is the most it may take on one H100-class GPU."""

    name: str
    budget_s: float
    what: str
    cuda_only: bool = False  # needs CUDA kernels (semi-structured sparsity): skipped on a forced CPU run
    multi: bool = False      # needs 2+ devices (GPUs, or CPU processes with --device cpu)


PARTS = (
    Part("env", 10, "GPU model, driver, torch/CUDA/cuDNN/Lightning/transformers versions"),
    Part("step", 150, "bf16-mixed training step: dense vs MultiFlowCallback vs ModelPruning, hooks/step, masks exact"),
    Part("calibration", 90, "calibration pairs/s at 224 and 384 px (fp32 statistics), 3000 x (32+32) estimate"),
    Part("memory", 75, "peak GPU memory: calibration vs plain forward, training step dense vs pruned"),
    Part("speed", 90, "2:4 semi-structured vs dense bf16 (BLIP-base linears, image encoder)", cuda_only=True),
    Part("ddp", 90, "DDP (NCCL) masks identical across ranks and equal to one process", multi=True),
    Part("fsdp2", 120, "FSDP2 masks exact after every step, equal to one process, resume", multi=True),
)
PART_NAMES = tuple(p.name for p in PARTS)


@dataclass
class Settings:
    device: str = "cuda"           # "cuda", or "cpu" to run the same logic without a GPU
    shape: str = "base"
    precision: str = "bf16-mixed"
    batch_size: int = 16
    steps: int = 10
    warmup: int = 3
    rounds: int = 2
    sparsity: float = 0.75
    calib_batch_size: int = 32
    calib_batches: int = 6
    image_sizes: tuple[int, ...] = (224, 384)
    processes: int = 0             # multi-process parts: 0 = every visible GPU
    isolate: bool = True           # each step/memory configuration in a fresh process
    speed_batches: tuple[int, ...] = (16, 64, 256)
    scratch: str = ""              # folder for the multi-process runs' files (set by `run`)
    time_scale: float = 1.0        # every part budget x this (a CPU run or a slower GPU)


def plan(only: list[str] | None, budget_s: float | None, settings: "Settings") -> list[tuple[Part, str | None]]:
    """The parts in order, each with None or why it is skipped before starting: this machine cannot run it
    (no CUDA kernels, one GPU), or its budget would take the run past `budget_s` (None: every part that can
    run, about 10 minutes on one GPU)."""
    out, planned = [], 0.0
    for part in (p for p in PARTS if not only or p.name in only):
        skip = why_not_run(part, settings)
        if skip is None and budget_s is not None and planned + part.budget_s * settings.time_scale > budget_s:
            skip = (f"skipped: its budget ({part.budget_s:.0f} s) would take the run past --budget "
                    f"{budget_s:.0f} s ({budget_s - planned:.0f} s left after the parts before it)")
        if skip is None:
            planned += part.budget_s * settings.time_scale
        out.append((part, skip))
    return out


def planned_seconds(steps: list[tuple[Part, str | None]], settings: "Settings") -> float:
    return sum(part.budget_s * settings.time_scale for part, skip in steps if skip is None)


def dry_listing(only: list[str] | None, budget_s: float | None, settings: "Settings") -> str:
    steps = plan(only, budget_s, settings)
    lines = [f"bench gpu would run (up to {planned_seconds(steps, settings):.0f} s):"]
    for part, skip in steps:
        lines.append(f"  {part.name:<12} up to {part.budget_s:>4.0f} s  {part.what}" + (f"  [{skip}]" if skip else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ parts
def part_env(settings: Settings, deadline: float) -> dict:
    import lightning
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "lightning": lightning.__version__, "transformers": transformers.__version__,
        "host_cpus": os.cpu_count(), "device": settings.device,
    }
    if settings.device == "cuda":
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError) as err:
            env["driver"] = f"unknown ({type(err).__name__})"
    return env


def _accelerator(settings: Settings) -> str:
    return "cuda" if settings.device == "cuda" else "cpu"


def _training_run(settings: Settings, mode: str, steps: int, warmup: int) -> dict:
    from .core import _isolated, time_training

    job = (settings.shape, settings.batch_size, steps, warmup, mode, settings.sparsity, _accelerator(settings),
           settings.precision)
    return _isolated(time_training, job) if settings.isolate else time_training(*job)


def part_step(settings: Settings, deadline: float) -> dict:
    """Interleaved rounds of the three configurations; a round that would pass the deadline is not started."""
    modes = ("dense", "multiflow", "modelpruning")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    round_s: list[float] = []
    for _ in range(settings.rounds):
        if round_s and time.monotonic() + max(round_s) > deadline:
            break
        start = time.monotonic()
        for mode in modes:
            runs[mode].append(_training_run(settings, mode, settings.steps, settings.warmup))
        round_s.append(time.monotonic() - start)
    med = {m: statistics.median(r["median_step_s"] for r in runs[m]) for m in modes}
    multiflow = runs["multiflow"]
    hooks = statistics.median(r["mask_hooks_s_per_step"] for r in multiflow)
    return {
        "rounds": len(round_s), "rounds_asked": settings.rounds, "steps_per_run": settings.steps,
        "batch_size": settings.batch_size, "precision": settings.precision, "sparsity": settings.sparsity,
        "prunable_weights": multiflow[-1]["prunable_weights"],
        "median_step_s": med,
        "multiflow_over_dense": med["multiflow"] / med["dense"],
        "modelpruning_over_dense": med["modelpruning"] / med["dense"],
        "hooks_s_per_step": hooks,
        "hooks_over_dense_step": hooks / med["dense"],
        "hook_target": HOOK_TARGET,
        "hook_target_met": hooks / med["dense"] <= HOOK_TARGET,
        "pruned_nonzero_after_steps": max(r["pruned_nonzero"] for r in multiflow),
        "masks_exact": all(r["pruned_nonzero"] == 0 for r in multiflow),
    }


def blip_backbone(shape: Shape, image_size: int):
    """A randomly initialised BLIP backbone of `shape` (base: BLIP-base, ViT-B/16 + BERT-base encoder/decoder)."""
    from mflightning.models.blip import BlipBackbone
    from mflightning.models.blip_config import tiny_config

    config = tiny_config(shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers, num_heads=shape.heads,
                         image_size=image_size, patch_size=shape.patch, embed_dim=min(256, shape.hidden),
                         max_position_embeddings=max(64, shape.text_len))
    config.text_config.intermediate_size = int(shape.mlp_ratio * shape.hidden)
    config.vision_config.intermediate_size = int(shape.mlp_ratio * shape.hidden)
    torch.manual_seed(0)
    return BlipBackbone.from_config(config)


def calibration_batches(shape: Shape, image_size: int, batch_size: int, count: int, device: str) -> list[dict]:
    from .shapes import make_batch

    sized = replace(shape, image_size=image_size)
    out = []
    for i in range(count):
        batch = make_batch(sized, batch_size, seed=1000 + i)
        batch["input_ids"] = batch["input_ids"].clamp(max=shape.vocab - 3)  # below [DEC]/[ENC], the last ids
        out.append({k: v.to(device) for k, v in batch.items() if k != "label"})
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def calibration_figures(settings: Settings, image_size: int, measure_memory: bool = False) -> dict:
    """Pairs/s of a plain no-grad forward and of calibration (hooks + fp32 statistics) over the same batches,
    fp32 weights and activations (as the authors calibrate); the first batch warms up and is not timed."""
    from mflightning.pruning import collect_input_norms, find_targets, resolve_modalities

    shape = SHAPES[settings.shape]
    device = settings.device
    model = blip_backbone(shape, image_size).to(device).eval()
    targets = find_targets(model, resolve_modalities(model, "blip", ()))
    batches = calibration_batches(shape, image_size, settings.calib_batch_size, settings.calib_batches + 1, device)
    forward = lambda m, b: m(b["image"], b["input_ids"], b["attention_mask"])  # noqa: E731

    def plain(chunk: list[dict]) -> None:
        with torch.no_grad():
            for batch in chunk:
                forward(model, batch)

    def calibrate(chunk: list[dict]) -> None:
        collect_input_norms(model, targets, chunk, forward=forward)

    from .core import peak_memory_bytes

    figures: dict[str, Any] = {"image_size": image_size, "batch_size": settings.calib_batch_size,
                               "timed_batches": settings.calib_batches,
                               "prunable_weights": sum(t.param.numel() for t in targets.values())}
    for name, fn in (("plain", plain), ("calibration", calibrate)):
        fn(batches[:1])  # warm-up: kernels, allocator
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn(batches[1:])
        _sync(device)
        seconds = time.perf_counter() - start
        pairs = settings.calib_batch_size * settings.calib_batches
        figures[f"{name}_s"] = seconds
        figures[f"{name}_pairs_per_s"] = pairs / seconds
        if measure_memory:
            figures[f"{name}_peak_memory_bytes"] = peak_memory_bytes(torch.device(device))
    figures["calibration_over_plain"] = figures["calibration_s"] / figures["plain_s"]
    figures["authors_calibration_estimate_s"] = AUTHORS_CALIBRATION_PAIRS / figures["calibration_pairs_per_s"]
    return figures


def _isolated_call(settings: Settings, fn: Callable[..., dict], *args: Any) -> dict:
    from .core import _isolated

    return _isolated(fn, (settings, *args)) if settings.isolate else fn(settings, *args)


def part_calibration(settings: Settings, deadline: float) -> dict:
    rows = []
    for size in settings.image_sizes:
        if rows and time.monotonic() + 2 * rows[-1]["calibration_s"] + 30 > deadline:
            rows.append({"image_size": size, "skipped": "part budget spent"})
            continue
        rows.append(_isolated_call(settings, calibration_figures, size))
    return {"rows": rows, "authors_pairs": AUTHORS_CALIBRATION_PAIRS, "paper": PAPER_CALIBRATION,
            "statistics_dtype": "fp32 squares summed in fp64 (fp32 on devices without fp64)"}


def part_memory(settings: Settings, deadline: float) -> dict:
    calib = _isolated_call(settings, calibration_figures, settings.image_sizes[0], True)
    steps = {mode: _training_run(settings, mode, steps=2, warmup=1) for mode in ("dense", "multiflow")}
    kind = "CUDA allocator peak" if settings.device == "cuda" else "process peak RSS (CPU run)"
    return {
        "measure": kind,
        "calibration_image_size": settings.image_sizes[0],
        "plain_forward_peak_bytes": calib["plain_peak_memory_bytes"],
        "calibration_peak_bytes": calib["calibration_peak_memory_bytes"],
        "train_step_peak_bytes": {m: r["peak_memory_bytes"] for m, r in steps.items()},
        "pruned_step_over_dense": steps["multiflow"]["peak_memory_bytes"] / steps["dense"]["peak_memory_bytes"],
    }


def part_speed(settings: Settings, deadline: float) -> dict:
    from .speed import encoder_rows, linear_rows

    rows = linear_rows(list(settings.speed_batches), repeats=10)
    if time.monotonic() + 60 < deadline:
        rows += encoder_rows(list(settings.speed_batches[:2]), repeats=10)
    return {"rows": rows}


def _processes(settings: Settings) -> int:
    if settings.processes:
        return settings.processes
    return torch.cuda.device_count() if settings.device == "cuda" else 2


def _launch(settings: Settings, mode: str, processes: int, out: Path, deadline: float) -> None:
    """One `gpu_multi` run in its own process group, killed whole (every rank) if it passes the deadline."""
    import signal

    cmd = [sys.executable, "-m", "mflightning.bench.gpu_multi", mode, str(out), "--processes", str(processes),
           "--device", settings.device, "--shape", settings.shape, "--precision", settings.precision]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise TimeoutError(f"{mode} run on {processes} process(es) passed the part's budget and was stopped") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run on {processes} process(es) failed (exit {proc.returncode}): {stderr[-3000:]}")


def _multi(settings: Settings, mode: str, deadline: float) -> dict:
    """Run `gpu_multi` in `mode` (ddp / fsdp2) and compare with one process on the same batches (that
    reference run is made once per report and shared by both parts)."""
    from .gpu_multi import compare

    world = _processes(settings)
    scratch = Path(settings.scratch)
    if not (scratch / "single" / "rank0.pt").exists():
        _launch(settings, "single", 1, scratch / "single", deadline)
    _launch(settings, mode, world, scratch / mode, deadline)
    return compare(scratch / "single", scratch / mode, world)


def part_ddp(settings: Settings, deadline: float) -> dict:
    return _multi(settings, "ddp", deadline)


def part_fsdp2(settings: Settings, deadline: float) -> dict:
    return _multi(settings, "fsdp2", deadline)


RUNNERS: dict[str, Callable[[Settings, float], dict]] = {
    "env": part_env, "step": part_step, "calibration": part_calibration, "memory": part_memory,
    "speed": part_speed, "ddp": part_ddp, "fsdp2": part_fsdp2,
}


def why_not_run(part: Part, settings: Settings) -> str | None:
    """A reason this machine cannot run `part` (independent of time), or None."""
    if part.cuda_only and settings.device != "cuda":
        return "skipped: needs CUDA (torch.sparse.to_sparse_semi_structured runs only on NVIDIA GPUs)"
    if part.multi and _processes(settings) < 2:
        return (f"skipped: needs 2+ GPUs, this machine has {_processes(settings)}; "
                "run it on a multi-GPU machine (single-GPU parts are unaffected)")
    return None


def run(settings: Settings, only: list[str] | None, budget_s: float | None) -> dict:
    started = time.monotonic()
    steps = plan(only, budget_s, settings)
    budget_s = planned_seconds(steps, settings) if budget_s is None else budget_s
    report: dict[str, Any] = {"benchmark": "gpu", "settings": vars(settings).copy(), "budget_s": budget_s, "parts": {}}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        settings = replace(settings, scratch=scratch)
        _run_parts(settings, steps, budget_s, started, report)
    report["seconds"] = time.monotonic() - started
    return report


def _run_parts(settings: Settings, steps: list[tuple[Part, str | None]], budget_s: float, started: float,
               report: dict) -> None:
    for part, skip in steps:
        if skip:
            report["parts"][part.name] = {"status": "skipped", "note": skip}
            continue
        part_s = part.budget_s * settings.time_scale
        remaining = budget_s - (time.monotonic() - started)
        if remaining < part_s * 0.25:
            report["parts"][part.name] = {"status": "skipped", "note": f"skipped: {remaining:.0f} s left of --budget"}
            continue
        deadline = time.monotonic() + min(part_s, remaining)
        print(f"[bench gpu] {part.name}: up to {min(part_s, remaining):.0f} s", flush=True)
        start = time.monotonic()
        try:
            result = RUNNERS[part.name](settings, deadline)
            report["parts"][part.name] = {"status": "ok", "seconds": time.monotonic() - start, **result}
        except Exception as err:  # a part that fails is reported; the others still run
            report["parts"][part.name] = {"status": "failed", "seconds": time.monotonic() - start,
                                          "error": f"{type(err).__name__}: {err}",
                                          "traceback": traceback.format_exc(limit=8)}
        if part.name != "env" and time.monotonic() - start > part_s:
            report["parts"][part.name]["over_budget"] = True


# ------------------------------------------------------------------------------------------ report
def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# bench gpu: {s['shape']} shapes on {s['device']}, {s['precision']} ({report['seconds']:.0f} s of "
             f"{report['budget_s']:.0f} s budget)", ""]
    parts = report["parts"]
    for name in PART_NAMES:
        if name not in parts:
            continue
        p = parts[name]
        lines.append(f"## {name}")
        if p["status"] != "ok":
            lines += [p.get("note") or f"failed: {p.get('error')}", ""]
            continue
        if name == "env":
            lines += [f"- {k}: {v}" for k, v in p.items() if k not in ("status", "seconds")]
        elif name == "step":
            m = p["median_step_s"]
            lines += [
                f"{p['prunable_weights']:,} prunable weights, batch {p['batch_size']}, sparsity {p['sparsity']}, "
                f"{p['rounds']} interleaved round(s) of {p['steps_per_run']} steps, medians",
                "", "| figure | dense | MultiFlowCallback | ModelPruning |", "|---|---|---|---|",
                f"| step (ms) | {m['dense'] * 1e3:.2f} | {m['multiflow'] * 1e3:.2f} | {m['modelpruning'] * 1e3:.2f} |",
                f"| step / dense | 1 | {p['multiflow_over_dense']:.3f} | {p['modelpruning_over_dense']:.3f} |",
                f"| mask hooks / dense step | - | {p['hooks_over_dense_step']:.4f} (target <= {p['hook_target']}: "
                f"{'met' if p['hook_target_met'] else 'NOT met'}) | - |",
                f"| pruned weights non-zero after the steps | - | {p['pruned_nonzero_after_steps']} | - |",
            ]
        elif name == "calibration":
            lines += ["| image px | plain pairs/s | calibration pairs/s | calibration / plain | "
                      f"{p['authors_pairs']:,} pairs (3000 x (32+32)) |", "|---|---|---|---|---|"]
            for r in p["rows"]:
                if "skipped" in r:
                    lines.append(f"| {r['image_size']} | {r['skipped']} | | | |")
                else:
                    lines.append(f"| {r['image_size']} | {r['plain_pairs_per_s']:.1f} | {r['calibration_pairs_per_s']:.1f} | "
                                 f"{r['calibration_over_plain']:.3f} | {r['authors_calibration_estimate_s'] / 60:.1f} min |")
            lines += ["", f"The paper's figure for one pruning run: {p['paper']}. Statistics: {p['statistics_dtype']}."]
        elif name == "memory":
            t = p["train_step_peak_bytes"]
            lines += [f"Measure: {p['measure']}.", "",
                      f"- calibration at {p['calibration_image_size']} px: {_gib(p['calibration_peak_bytes'])} "
                      f"(plain forward {_gib(p['plain_forward_peak_bytes'])})",
                      f"- training step: dense {_gib(t['dense'])}, pruned {_gib(t['multiflow'])} "
                      f"({p['pruned_step_over_dense']:.3f}x)"]
        elif name == "speed":
            from .speed import markdown as speed_markdown

            lines.append(speed_markdown({"device": s["device"], "torch": torch.__version__, "rows": p["rows"]}))
        elif name in ("ddp", "fsdp2"):
            lines += [f"- {k}: {v}" for k, v in p.items() if k not in ("status",)]
        lines.append("")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="+", choices=PART_NAMES, help="run only these parts (in the usual order)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run; parts that would pass it are skipped (default: every part "
                             "this machine can run, 415 s on one GPU, 625 s with 2+)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu runs the same logic without a GPU (for tests; figures mean nothing there)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="base")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--processes", type=int, default=0, help="multi-process parts: 0 = every visible GPU")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch for step/memory")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calib-batches", type=int, default=6)
    parser.add_argument("--calib-batch-size", type=int, default=32)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224, 384], help="calibration image sizes")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply every part's budget (CPU runs, slower GPUs)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.add_argument("--output", type=Path, default=Path("outputs/bench/gpu.json"))


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(device=args.device, shape=args.shape, precision=args.precision, batch_size=args.batch_size,
                    steps=args.steps, rounds=args.rounds, calib_batches=args.calib_batches,
                    calib_batch_size=args.calib_batch_size, image_sizes=tuple(args.image_sizes), processes=args.processes,
                    isolate=args.isolate, time_scale=args.time_scale)


def main(args: argparse.Namespace) -> dict | None:
    settings = settings_from(args)
    if args.dry_run:
        print(dry_listing(args.only, args.budget, settings))
        return None
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench gpu: no CUDA GPU is visible here (torch.cuda.is_available() is False), so nothing was run.\n"
              "Run it on a machine with an NVIDIA GPU; `--device cpu` exercises the same code on the CPU.\n",
              file=sys.stderr)
        print(dry_listing(args.only, args.budget, settings), file=sys.stderr)
        raise SystemExit(2)
    report = run(settings, args.only, args.budget)
    from .core import write_report

    write_report(report, markdown(report), args.output)
    failed = [n for n, p in report["parts"].items() if p["status"] == "failed"]
    if failed:
        print(f"bench gpu: part(s) failed: {', '.join(failed)} (errors in {args.output})", file=sys.stderr)
        raise SystemExit(1)
    return report
