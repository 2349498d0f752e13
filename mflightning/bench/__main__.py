"""Entry point: `python -m mflightning.bench <name> [options]`."""
from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "core": "mflightning.bench.core",
    "quality": "mflightning.bench.quality",
    "cost": "mflightning.bench.cost",
    "speed": "mflightning.bench.speed",
    "gpu": "mflightning.bench.gpu",
    "methods": "mflightning.bench.methods",
}


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m mflightning.bench", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True)
    modules = {}
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0]))
    args = parser.parse_args(argv)
    return modules[args.name].main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
