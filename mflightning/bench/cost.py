"""`python -m mflightning.bench cost`: pruning cost on BLIP-base shapes and the demo model, side by side.

For each model size, the figures of `bench core` (calibration / plain forward, mask computation
time, training step / dense step for MultiFlowCallback and Lightning's ModelPruning, extra memory
per prunable weight, checkpoint size), medians over interleaved repeated runs, ratios within a run.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import core
from .shapes import SHAPES


def run(args: argparse.Namespace) -> dict:
    report: dict[str, Any] = {"benchmark": "cost", "sparsity": args.sparsity, "shapes": {}}
    for shape in dict.fromkeys(args.shapes):  # each size once, in the order given
        shape_args = argparse.Namespace(**{**vars(args), "shape": shape})
        report["shapes"][shape] = core.run(shape_args)
    return report


def markdown(report: dict) -> str:
    shapes = list(report["shapes"])
    first = report["shapes"][shapes[0]]
    header = "| figure | " + " | ".join(f"{s}: MultiFlowCallback | {s}: ModelPruning" for s in shapes) + " |"
    lines = [
        f"Cost benchmark at sparsity {report['sparsity']}, {first['device']} ({first['torch_threads']} threads); "
        "medians over interleaved runs.",
        "",
        "| model | prunable weights |",
        "|---|---|",
    ]
    lines += [f"| {s} | {report['shapes'][s]['calibration']['prunable_weights']:,} |" for s in shapes]
    lines += ["", header, "|---|" + "---|---|" * len(shapes)]

    def row(label: str, ours, theirs) -> str:
        cells = []
        for s in shapes:
            r = report["shapes"][s]
            cells += [ours(r), theirs(r)]
        return f"| {label} | " + " | ".join(cells) + " |"

    t = lambda r: r["training"]  # noqa: E731
    lines += [
        row("calibration time / plain forward", lambda r: f"{r['calibration']['calibration_over_forward']:.3f}", lambda r: "-"),
        row("calibration time per batch (s)",
            lambda r: f"{r['calibration']['calibration_s'] / r['calibration']['calibration_batches']:.3f}", lambda r: "-"),
        row("mask computation (s)", lambda r: f"{r['calibration']['mask_computation_s']:.2f}", lambda r: "-"),
        row("training step / dense step", lambda r: f"{t(r)['multiflow_over_dense']:.3f}",
            lambda r: f"{t(r)['modelpruning_over_dense']:.3f}"),
        row("mask hooks per step / dense step",
            lambda r: f"{t(r)['multiflow']['mask_hooks_s_per_step'] / t(r)['dense']['median_step_s']:.3f}",
            lambda r: "-"),
        row("extra memory per prunable weight (bytes)",
            lambda r: f"{t(r)['multiflow']['extra_bytes_per_prunable_weight']:.2f}",
            lambda r: f"{t(r)['modelpruning']['extra_bytes_per_prunable_weight']:.2f}"),
        row("checkpoint size (MB)", lambda r: f"{t(r)['multiflow']['checkpoint_bytes'] / 1e6:.1f}",
            lambda r: f"{t(r)['modelpruning']['checkpoint_bytes'] / 1e6:.1f}"),
        row("dense checkpoint size (MB)", lambda r: f"{t(r)['dense']['checkpoint_bytes'] / 1e6:.1f}",
            lambda r: f"{t(r)['dense']['checkpoint_bytes'] / 1e6:.1f}"),
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    core.add_arguments(parser)
    parser.set_defaults(output=Path("outputs/bench/cost.json"))
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["base", "demo"],
                        help="model sizes measured side by side")


def main(args: argparse.Namespace) -> dict:
    report = run(args)
    core.write_report(report, markdown(report), args.output)
    return report
