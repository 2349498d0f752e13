"""`python -m mflightning.bench speed`: dense bf16 against 2:4 semi-structured inference on a CUDA GPU.

Measures BLIP-base's vision and text linears (768x768 attention projections, the 768->3072 and
3072->768 MLP layers, the vision encoder's fused 768->2304 qkv) and the whole BLIP-base image
encoder, dense bf16 against the same weights pruned 2:4 (magnitude inside each run of four, the
pattern MultiFlow's `pattern="2:4"` produces) and converted with
`torch.sparse.to_sparse_semi_structured`. Speed-ups are ratios within one run (CUDA events,
median of repeats); each sparse output is checked against the dense output of the same pruned
weights within bf16 tolerance. Without a CUDA GPU it says so and writes a report marked skipped:
the semi-structured kernels exist only there.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mflightning.pruning.allocation import pattern_masks

# (name, out_features, in_features, tokens per image-or-caption)
LINEARS = (
    ("vision attention projection 768x768", 768, 768, 197),
    ("vision qkv 768->2304", 2304, 768, 197),
    ("vision mlp fc1 768->3072", 3072, 768, 197),
    ("vision mlp fc2 3072->768", 768, 3072, 197),
    ("text attention projection 768x768", 768, 768, 35),
    ("text mlp fc1 768->3072", 3072, 768, 35),
    ("text mlp fc2 3072->768", 768, 3072, 35),
)


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """`weight` with the 2 smallest |w| of every 4 consecutive inputs set to zero."""
    mask = pattern_masks({"w": weight.abs().float()}, "2:4")["w"]
    return weight * mask


def time_cuda(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def linear_rows(batch_sizes: list[int], repeats: int) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for name, out_f, in_f, tokens in LINEARS:
        weight = two_four(torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02)
        sparse = to_sparse_semi_structured(weight)
        for batch in batch_sizes:
            x = torch.randn(batch * tokens, in_f, device="cuda", dtype=torch.bfloat16)
            row: dict[str, Any] = {"layer": name, "batch": batch, "tokens": batch * tokens}
            try:
                dense_out = torch.nn.functional.linear(x, weight)
                sparse_out = torch.nn.functional.linear(x, sparse)
                row["max_abs_diff"] = (dense_out - sparse_out).abs().max().item()
                row["match"] = bool(torch.allclose(dense_out.float(), sparse_out.float(), rtol=2e-2, atol=2e-2))
                row["dense_ms"] = time_cuda(lambda: torch.nn.functional.linear(x, weight), repeats)
                row["sparse_ms"] = time_cuda(lambda: torch.nn.functional.linear(x, sparse), repeats)
                row["speedup"] = row["dense_ms"] / row["sparse_ms"]
            except (RuntimeError, NotImplementedError) as err:  # a shape the kernels refuse
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            rows.append(row)
    return rows


def encoder_rows(batch_sizes: list[int], repeats: int) -> list[dict]:
    """The whole BLIP-base image encoder: dense bf16 against every Linear 2:4 semi-structured."""
    from torch.sparse import to_sparse_semi_structured
    from transformers import BlipVisionConfig, BlipVisionModel

    torch.manual_seed(0)
    config = BlipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=16)
    dense = BlipVisionModel(config).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for module in dense.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(two_four(module.weight))
    sparse = BlipVisionModel(config).to("cuda", torch.bfloat16).eval()
    sparse.load_state_dict(dense.state_dict())
    for module in sparse.modules():
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    rows = []
    for batch in batch_sizes:
        pixels = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
        row: dict[str, Any] = {"layer": "BLIP-base image encoder (12 layers)", "batch": batch}
        try:
            with torch.inference_mode():
                a = dense(pixel_values=pixels).last_hidden_state
                b = sparse(pixel_values=pixels).last_hidden_state
                row["max_abs_diff"] = (a - b).abs().max().item()
                row["match"] = bool(torch.allclose(a.float(), b.float(), rtol=5e-2, atol=5e-2))
                row["dense_ms"] = time_cuda(lambda: dense(pixel_values=pixels), repeats)
                row["sparse_ms"] = time_cuda(lambda: sparse(pixel_values=pixels), repeats)
            row["speedup"] = row["dense_ms"] / row["sparse_ms"]
        except (RuntimeError, NotImplementedError) as err:
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    if report.get("skipped"):
        return f"bench speed skipped: {report['skipped']}\n"
    lines = [f"2:4 semi-structured vs dense bf16 on {report['device']} (torch {report['torch']}); median ms",
             "", "| layer | batch | dense ms | 2:4 ms | speed-up | outputs match |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['layer']} | {r['batch']} | - | - | {r['error']} | - |")
        else:
            lines.append(f"| {r['layer']} | {r['batch']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | "
                         f"{r['speedup']:.2f}x | {r['match']} (max diff {r['max_abs_diff']:.3g}) |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-encoder", dest="encoder", action="store_false", help="linears only")
    parser.add_argument("--output", type=Path, default=Path("outputs/bench/speed.json"))


def main(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        report: dict[str, Any] = {"benchmark": "speed", "skipped": "no CUDA GPU here; the 2:4 semi-structured "
                                  "kernels (torch.sparse.to_sparse_semi_structured) run only on NVIDIA GPUs"}
    else:
        rows = linear_rows(args.batch_sizes, args.repeats)
        if args.encoder:
            rows += encoder_rows(args.batch_sizes, args.repeats)
        report = {"benchmark": "speed", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    args.output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report
