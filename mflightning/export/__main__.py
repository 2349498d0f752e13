"""`python -m mflightning.export`: a pruned checkpoint in a compressed-tensors sparse layout, or the size bench.

    python -m mflightning.export CHECKPOINT --masks masks.safetensors --output_dir out/ [--format auto] [--dtype bf16]
    python -m mflightning.export last.ckpt --output_dir out/ --format transformers [--task captioning]
    python -m mflightning.export last.ckpt --output_dir out/          # masks from the checkpoint's MultiFlowCallback
    python -m mflightning.export --bench [--layers 12] [--workdir DIR] [--markdown sizes.md]

`run_export(argv)` is what `mflightning export` calls with the arguments after the subcommand.
"""
from __future__ import annotations

import argparse
import sys

from .layouts import AUTO, FORMATS

TRANSFORMERS = "transformers"


def export_parser(prog: str = "mflightning export") -> argparse.ArgumentParser:
    """Arguments of the export command (and of `--bench`)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write a pruned model in the compressed-tensors sparse layouts "
                    "(sparse-bitmask, sparse-24-bitmask), or as a transformers model folder (--format transformers).",
    )
    parser.add_argument("source", nargs="?", help="Lightning checkpoint (.ckpt), torch or safetensors state dict, "
                                                  "or a save_pretrained folder")
    parser.add_argument("--masks", help="mask file (mflightning prune's masks.safetensors); default: the masks "
                                        "of the checkpoint's MultiFlowCallback state")
    parser.add_argument("--output_dir", help="folder for model.safetensors and config.json")
    parser.add_argument("--format", default=AUTO, choices=(*FORMATS, AUTO, TRANSFORMERS),
                        help="auto: sparse-24-bitmask when every masked layer is 2:4, else sparse-bitmask; "
                             "transformers: a BLIP task checkpoint as the Blip* class of its task, or a transformers "
                             "model's save_pretrained folder (dense weights, pruned ones zero), with model card and "
                             "mask file")
    parser.add_argument("--task", default=None, choices=("retrieval", "captioning", "vqa"),
                        help="--format transformers: the checkpoint's task (default: read from its hyperparameters)")
    parser.add_argument("--dtype", default=None, help="cast floating-point tensors: bf16, fp16 or fp32 (default: keep)")
    parser.add_argument("--prefix", default=None,
                        help="what the checkpoint puts in front of the mask names (default: found)")
    parser.add_argument("--unsafe_load", action="store_true",
                        help="torch.load with weights_only=False (unpickles anything: trusted files only)")
    parser.add_argument("--bench", action="store_true", help="measure file sizes at BLIP-base shapes instead")
    parser.add_argument("--layers", type=int, default=12, help="--bench: layers per tower (BLIP-base: 12)")
    parser.add_argument("--workdir", default=None, help="--bench: where the files go (default: a temporary folder)")
    parser.add_argument("--markdown", default=None, help="--bench: also write the table to this file")
    return parser


def run_export(argv: list[str] | None = None, prog: str = "mflightning export"):
    """Parse `argv` and export (returns the ExportReport) or bench (returns the SizeRows); prints a summary."""
    parser = export_parser(prog)
    args = parser.parse_args(argv)
    if args.bench:
        return _run_bench(args)
    if not args.source or not args.output_dir:
        parser.error("an export needs SOURCE and --output_dir (or --bench)")
    if args.format == TRANSFORMERS:
        if args.dtype or args.prefix:
            parser.error("--dtype and --prefix apply to the compressed formats only")
        from .transformers_export import export_transformers

        export = export_transformers(args.source, args.output_dir, masks=args.masks, task=args.task,
                                     weights_only=not args.unsafe_load)
        print(export.summary())
        return export
    from .writer import export_compressed

    try:
        report = export_compressed(
            args.source, args.masks, args.output_dir, format=args.format, dtype=args.dtype, prefix=args.prefix,
            weights_only=not args.unsafe_load,
        )
    except ValueError as err:  # the library names its Python argument; here the user typed options
        message = str(err).replace("pass masks= (a PruningResult, a mask file, or a name -> bool mask dict)",
                                   "pass --masks MASK_FILE").replace("pass masks= to choose", "pass --masks to choose")
        if message == str(err):
            raise
        raise ValueError(message) from err
    print(report.summary())
    return report


def _run_bench(args: argparse.Namespace):
    from pathlib import Path

    from .bench import bench_sizes, machine, markdown_table, verdict

    rows = bench_sizes(args.workdir, num_layers=args.layers)
    table = markdown_table(rows)
    print(table)
    print(verdict(rows))
    print(f"machine: {machine()}")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    """Console entry: a bad input is one line on stderr with exit status 2."""
    try:
        run_export(argv, prog="python -m mflightning.export")
    except (ValueError, FileNotFoundError) as err:
        print(f"mflightning export: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
