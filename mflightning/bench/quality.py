"""`python -m mflightning.bench quality`: downstream quality of every pruning method (the paper's Tables 1-3).

On the synthetic world (`mflightning.data.generate_world`), for a small BLIP-style and a small
XVLM-style model pretrained on the world's generic caption split: each method x sparsity prunes
the pretrained backbone ONCE on the calibration split, and that one mask file is fine-tuned
(kept sparse by `MultiFlowCallback`) on retrieval (R@1, R@5 both directions), captioning (BLEU@4,
CIDEr) and VQA (accuracy), once per fine-tuning seed. Writes into `--out`:
- `runs/<model>/<task>/<method>@<sparsity>-s<seed>.json`: one file per fine-tuning (resumable:
  existing files are skipped when the settings match `settings.json`);
- `masks/<model>/<method>@<sparsity>.safetensors`: the cached masks;
- `quality.json` (every run + the mean/std summary), `quality.md` (tables laid out like the
  paper's: rows = methods, column groups = sparsity x metrics; best pruned value bold, second
  underlined) and `quality_<task>.png` (metric against sparsity, one line per method), headed by
  the cross-task summary (normalised score and mean rank per method) and its plot
  `quality_cross_task.png` (the paper's Figure 3), and each dense model checked against its task's
  image-blind level (`reference` in the JSON).
Backbones are pretrained in this process, then fine-tuned `--jobs` at a time in one-thread worker
processes (the default: one per free core).

The models come from `mflightning.families` (the demo's builders; one registered family per
`--models` choice), the grid and settings from `quality_settings.py`, the tables and plots from
`quality_report.py`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch

from mflightning.baselines import chance_and_blind
from mflightning.data.synthetic import WorldSizes, generate_world
from mflightning.families import BackboneFamily, calibration_loader, finetune_task, get_family
from mflightning.pretrain import pretrain_record
from mflightning.runtime import free_cores, quiet_libraries

from .quality_classification import CLASSES, blind_level, finetune_classification
from .quality_classification import world_for as classes_for
from .quality_report import (cross_task, cross_task_table, dense_check, markdown_tables, plot_cross_task,
                             plot_quality, summarise)
from .quality_settings import (  # noqa: F401  (importable from here as before)
    METHODS,
    METRICS,
    MODELS,
    TASK_TITLES,
    TASKS,
    MethodSpec,
    BUDGET_FIELDS,
    QualitySettings,
    default_budgets,
    grid,
    optimizer_steps,
    run_key,
    set_budget,
    settings_fingerprint,
)

# ---------------------------------------------------------------------------------------- one run
def finetune(family: BackboneFamily, task: str, backbone, vocab: str, world, s: QualitySettings, seed: int, masks,
             work_dir: Path) -> dict[str, Any]:
    """Fine-tune a copy of `backbone` on `task` (kept sparse by `masks` when given); test metrics + sparsity."""
    if task == "classification":  # the vision-only miniature: the image encoder on the world's objects
        metrics, sparsity = finetune_classification(backbone, classes_for(world.root, s), s.budget(family.name, task),
                                                    seed=seed, image_size=s.image_size, masks=masks,
                                                    root_dir=work_dir, num_workers=s.loader_workers)
        return {"metrics": {k: float(v) for k, v in metrics.items()}, "realised_sparsity": sparsity}
    metrics, sparsity = finetune_task(family, task, backbone, vocab, world, s.budget(family.name, task), seed=seed,
                                      k_test=s.k_test, image_size=s.image_size, masks=masks, output_dir=work_dir,
                                      root_dir=work_dir, num_workers=s.loader_workers)
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "realised_sparsity": sparsity}


def compute_masks_for(family: BackboneFamily, method: str, sparsity: float, backbone, vocab: str, calibration,
                      s: QualitySettings, path: Path):
    """Prune the pretrained backbone ONCE for (method, sparsity), or load the cached masks."""
    from mflightning.pruning import PruningResult, get_method, prune

    if path.is_file():
        return PruningResult.load(path), 0.0
    import lightning as L

    spec = METHODS[method]
    # Seeded here, a backbone's masks do not depend on what this process ran before or on which worker
    # runs it (SNIP's pretraining loss samples ITM hard negatives from the global RNG; the calibration crops
    # are seeded per item).
    L.seed_everything(0, workers=True, verbose=False)
    started = time.perf_counter()
    gradients = get_method(spec.method).needs in ("gradients", "gradient_rows")  # SNIP, IterSNIP, CHITA(++)
    loss = family.pruning_loss(backbone, vocab) if gradients else None
    result = prune(backbone, sparsity=sparsity, method=spec.method, calibration=calibration,
                   num_batches=s.calibration_batches, allocation=spec.allocation, invert=spec.invert, loss=loss,
                   keep_scores=False, pattern=s.pattern, **({"rounds": spec.rounds} if spec.rounds else {}))
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    result.save(path)
    return result, seconds


def run_benchmark(out: str | os.PathLike, cache_dir: str | os.PathLike, s: QualitySettings,
                  log: Callable[[str], None] = print, jobs: int = 1) -> dict[str, Any]:
    """Run (or resume) the whole grid; write quality.json, quality.md and the plots; return the report.

    `jobs` > 1 fine-tunes that many backbones (model, method, sparsity) at once, each in its own
    process with one torch thread (on 2 cores, two jobs each ran as fast as one run alone).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    out, cache_dir = Path(out), Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = settings_fingerprint(s)
    settings_file = out / "settings.json"
    if settings_file.is_file():
        stored = json.loads(settings_file.read_text())
        if stored != json.loads(json.dumps(fingerprint)):
            diff = sorted(k for k in set(stored) | set(fingerprint)
                          if stored.get(k) != json.loads(json.dumps(fingerprint.get(k))))
            raise ValueError(f"{settings_file} was written with other settings (differ: {diff}); "
                             "use another --out or delete it to start over")
    settings_file.write_text(json.dumps(fingerprint, indent=1) + "\n")
    started = time.perf_counter()
    world_tag = hashlib.sha256(json.dumps([s.world_seed, asdict(s.sizes), s.image_size]).encode()).hexdigest()[:10]
    world = generate_world(cache_dir / f"world-{world_tag}", seed=s.world_seed, sizes=s.sizes,
                           image_size=s.image_size)
    log(f"[quality] world {world.root}")
    if "classification" in s.tasks:  # written here, before any worker reads it
        log(f"[quality] classification images {classes_for(world.root, s)}")
    model_dirs = {}
    for model in s.models:  # pretrained first (in this process): the backbones' workers only read them
        family = get_family(model)
        t = time.perf_counter()
        model_dirs[model] = family.pretrain(world.root, cache_dir, s.pretrain_config(family), progress=False,
                                            num_workers=s.loader_workers)
        record = pretrain_record(model_dirs[model])
        log(f"[quality] {model}: pretrained model {model_dirs[model]} (epoch losses {record['epoch_losses']}, "
            f"{time.perf_counter() - t:.0f}s)")
    units = [(model, method, sparsity) for model, method, sparsity in grid(s)]
    pending = [u for u in units if any(not _run_path(out, *u, task, seed).is_file()
                                       for task in s.tasks for seed in s.seeds)]
    log(f"[quality] {len(units) - len(pending)} of {len(units)} backbones cached; {len(pending)} to run"
        + (f" in {jobs} processes" if jobs > 1 and len(pending) > 1 else ""))
    args = [(out, s, u, str(model_dirs[u[0]]), world.root) for u in pending]
    if jobs == 1 or len(pending) < 2:
        for i, a in enumerate(args, 1):
            run_backbone(*a, log=lambda m, i=i: log(f"[quality] {i}/{len(pending)} {m}"))
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker) as pool:
            futures = {pool.submit(_run_backbone_quietly, *a): a[2] for a in args}
            for i, future in enumerate(as_completed(futures), 1):
                for line in future.result():  # a worker's error is raised here, naming its backbone
                    log(f"[quality] {i}/{len(pending)} {line}")
                log(f"[quality] {i}/{len(pending)} backbones done [{time.perf_counter() - started:.0f}s total]")
    shutil.rmtree(out / "work", ignore_errors=True)
    runs = collect_runs(out, s)
    chance, blind = chance_and_blind(world)
    if "classification" in s.tasks:
        chance["classification"] = {"top1": 100.0 / len(CLASSES), "top5": 500.0 / len(CLASSES)}
        blind["classification"] = blind_level(classes_for(world.root, s))
    report = {"settings": asdict(s), "runs": runs, "summary": summarise(runs), "cross_task": cross_task(runs, s),
              "reference": {"chance": chance, "image_blind": blind},
              "wall_seconds": round(time.perf_counter() - started, 1),  # this invocation (cached runs are skipped)
              "run_seconds_total": round(sum(r["seconds"] + r.get("mask_seconds", 0.0) for r in runs), 1),
              "jobs": jobs}
    (out / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "quality.md").write_text("## Across tasks\n\n" + cross_task_table(report["cross_task"], s)
                                    + "\n\n## Dense against the image-blind level\n\n"
                                    + dense_check(report["summary"], blind, s)
                                    + "\n\n## Per task\n\n" + markdown_tables(report["summary"], s) + "\n")
    plots = [plot_cross_task(report["cross_task"], s, out), *plot_quality(report["summary"], s, out)]
    log(f"[quality] wrote {out / 'quality.json'}, {out / 'quality.md'}, " + ", ".join(str(p) for p in plots)
        + f" in {report['wall_seconds']:.0f}s")
    return report


def _run_path(out: Path, model: str, method: str, sparsity: float | None, task: str, seed: int) -> Path:
    return out / "runs" / model / task / f"{run_key(method, sparsity, seed)}.json"


def run_backbone(out: Path, s: QualitySettings, unit: tuple[str, str, float | None], model_dir: str,
                 world_root: str, log: Callable[[str], None] = print) -> None:
    """Prune the pretrained `model_dir` for `unit` = (model, method, sparsity) (masks cached under `out/masks`)
    and fine-tune it on every task and seed still missing under `out/runs`."""
    from mflightning.data.synthetic import world_paths

    model, method, sparsity = unit
    family = get_family(model)
    world = world_paths(world_root)
    backbone, vocab, _ = family.load(model_dir)
    masks = None
    for task in s.tasks:
        for seed in s.seeds:
            path = _run_path(out, model, method, sparsity, task, seed)
            if path.is_file():
                continue
            mask_seconds = 0.0
            if sparsity is not None and masks is None:
                calibration = calibration_loader(world, vocab, image_size=s.image_size,
                                                 batch_size=s.calibration_batch_size, num_workers=s.loader_workers)
                mask_path = out / "masks" / model / f"{method}@{sparsity:g}.safetensors"
                masks, mask_seconds = compute_masks_for(family, method, sparsity, backbone, vocab,
                                                        calibration, s, mask_path)
            t = time.perf_counter()
            work = out / "work" / model / task / run_key(method, sparsity, seed)
            result = finetune(family, task, backbone, vocab, world, s, seed, masks, work)
            shutil.rmtree(work, ignore_errors=True)
            row = {"model": model, "method": method, "sparsity": sparsity, "seed": seed, "task": task,
                   **result, "seconds": round(time.perf_counter() - t, 1), "mask_seconds": round(mask_seconds, 2)}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")  # a run killed mid-write leaves no half file to resume from
            tmp.write_text(json.dumps(row, indent=1) + "\n")
            tmp.replace(path)
            shown = ", ".join(f"{k} {result['metrics'][k]:.2f}" for k, _ in METRICS[task] if k in result["metrics"])
            realised = result["realised_sparsity"].get("total")
            log(f"{model} {task} {run_key(method, sparsity, seed)}: {shown}"
                + (f" (sparsity {realised:.1%})" if realised is not None else "") + f" [{row['seconds']:.1f}s]")


def _init_worker() -> None:
    _exit_with_parent()
    quiet_libraries()
    torch.set_num_threads(1)
    if "fork" in multiprocessing.get_all_start_methods():
        # A spawned process spawns its own children too: each DataLoader worker (--loader-workers) would
        # re-import torch, ~8 s per loader; forked from this one-thread worker, they start at once.
        multiprocessing.set_start_method("fork", force=True)


def _exit_with_parent() -> None:
    """On Linux, kill this worker when the benchmark process dies (killed or interrupted): an orphaned
    worker would go on writing masks and runs into the output folder. Elsewhere a no-op."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no half-written run (atomic)
    except (OSError, AttributeError):
        return


def _run_backbone_quietly(*args) -> list[str]:
    """`run_backbone` in a worker process: its log lines are returned to the parent, which prints them."""
    lines: list[str] = []
    try:
        run_backbone(*args, log=lines.append)
    except Exception as error:
        raise RuntimeError(f"quality benchmark: backbone {args[2]} failed: {error!r}") from error
    return lines


def collect_runs(out: Path, s: QualitySettings) -> list[dict]:
    """The stored run records of the requested grid (a missing one is an error naming the file)."""
    runs = []
    for model, method, sparsity in grid(s):
        for task in s.tasks:
            for seed in s.seeds:
                path = _run_path(out, model, method, sparsity, task, seed)
                if not path.is_file():
                    raise FileNotFoundError(f"run result {path} is missing")
                runs.append(json.loads(path.read_text()))
    return runs


# ---------------------------------------------------------------------------------------- CLI
def _sizes(text: str) -> WorldSizes:
    """`train=160,test=60` -> WorldSizes with those fields replaced."""
    known = {f.name for f in fields(WorldSizes)}
    values = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in known or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"bad world size {part!r}: use name=int with name in {sorted(known)}")
        values[name] = int(value)
    return replace(QualitySettings().sizes, **values)


def _budget(text: str) -> tuple[str, str, str, int | float]:
    """`blip.vqa.epochs=24` -> ("blip", "vqa", "epochs", 24), checked against the models, tasks and fields."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 3:
        raise argparse.ArgumentTypeError(f"bad budget {text!r}: use MODEL.TASK.FIELD=VALUE, e.g. blip.vqa.epochs=24")
    model, task, name = parts
    try:
        number = float(value) if name == "lr" else int(value)
    except ValueError:
        number = None
    try:
        set_budget(default_budgets(), model, task, name, 1 if number is None else number)  # names, then value
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None  # names the key and what is wrong
    if number is None:
        kind = "a number" if name == "lr" else "an integer"
        raise argparse.ArgumentTypeError(f"budget {key.strip()}: {name} needs {kind}, got {value!r}")
    return model, task, name, number


def _positive(kind: type) -> Callable[[str], int | float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"needs {'an integer >= 1' if kind is int else 'a number > 0'}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def budgets_from_args(args: argparse.Namespace) -> dict:
    """The default budgets with the shorthand flags (--epochs, --vqa-epochs, --batch-size, --lr), then --budget, set."""
    budgets = default_budgets()
    shorthands = [("*", "retrieval", "epochs", args.epochs), ("*", "captioning", "epochs", args.epochs),
                  ("*", "vqa", "epochs", args.vqa_epochs), ("*", "*", "batch_size", args.batch_size),
                  ("*", "*", "lr", args.lr)]
    for model, task, name, value in [*(x for x in shorthands if x[3] is not None), *args.budget]:
        set_budget(budgets, model, task, name, value)
    return budgets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = QualitySettings()
    parser.add_argument("--out", default="outputs/bench/quality", help="output folder (runs, masks, JSON, tables, plots)")
    parser.add_argument("--cache-dir", default="outputs/cache", help="where worlds and pretrained models are kept")
    parser.add_argument("--tiny", action="store_true", help="seconds-long plumbing check (other size flags ignored)")
    parser.add_argument("--scale", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: QualitySettings.gpu() sizes for one GPU (224 px, 4x256 models, seeds 0 1 2; the size, "
                             "seed, epoch and lr flags are ignored; --models/--methods/--sparsities/--tasks/"
                             "--world-seed/--pattern and --budget apply); not yet run on a GPU, estimated 3-7 h for the full grid")
    parser.add_argument("--models", nargs="+", default=list(d.models), choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=list(d.methods), choices=list(METHODS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(d.sparsities))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds), help="fine-tuning seeds")
    parser.add_argument("--tasks", nargs="+", default=list(d.tasks), choices=TASKS)
    parser.add_argument("--world-seed", type=int, default=d.world_seed)
    parser.add_argument("--world-sizes", type=_sizes, default=d.sizes,
                        help="comma-separated WorldSizes overrides, e.g. calibration=4000,train=2000,test=500")
    for name in ("image_size", "patch_size", "hidden_size", "layers", "heads", "pretrain_epochs",
                 "pretrain_batch_size", "calibration_batches", "calibration_batch_size", "k_test"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    parser.add_argument("--pretrain-lr", type=float, default=None,
                        help="pretraining lr of every model (default per model: " +
                        ", ".join(f"{m} {lr:g}" for m, lr in d.pretrain_lrs.items()) + ")")
    defaults = "; ".join(f"{m}: " + ", ".join(f"{t} {b.epochs} ep / bs {b.batch_size} / lr {b.lr:g}"
                                                for t, b in per_task.items()) for m, per_task in d.budgets.items())
    parser.add_argument("--budget", action="append", default=[], type=_budget, metavar="MODEL.TASK.FIELD=VALUE",
                        help="fine-tuning budget of one model and task, FIELD one of " + ", ".join(BUDGET_FIELDS)
                             + " (MODEL or TASK may be *; repeatable, applied after the shorthands below), "
                             f"e.g. --budget blip.vqa.epochs=24 --budget blip.vqa.batch_size=8. Defaults: {defaults}")
    parser.add_argument("--epochs", type=_positive(int), default=None,
                        help="shorthand: retrieval and captioning epochs of every model (= --budget *.retrieval.epochs=N "
                             "--budget *.captioning.epochs=N)")
    parser.add_argument("--vqa-epochs", type=_positive(int), default=None, help="shorthand: VQA epochs of every model")
    parser.add_argument("--batch-size", type=_positive(int), default=None, help="shorthand: batch size of every model and task")
    parser.add_argument("--lr", type=_positive(float), default=None,
                        help="shorthand: fine-tuning learning rate of every model and task")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: free cores; with --jobs > 1, of the pretraining only)")
    parser.add_argument("--jobs", type=int, default=0,
                        help="backbones fine-tuned at once, each in its own process with one thread (default: "
                             "the free cores, or 1 with a GPU); on 2 cores 2 jobs are about twice as fast as 1")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="DataLoader processes per loader (default 0; --scale gpu: 8); results do not depend on it")
    parser.add_argument("--plan", action="store_true",
                        help="print the grid's work (backbones, fine-tunings, optimizer steps) and exit without running")
    parser.add_argument("--pattern", default=None,
                        help="N:M pattern for every method (e.g. 2:4; --sparsities is then 1 - N/M; use its own --out)")


def settings_from_args(args: argparse.Namespace) -> QualitySettings:
    """QualitySettings from parsed flags (`--tiny`: `QualitySettings.tiny()`, the other flags but
    --loader-workers ignored)."""
    if args.tiny:
        return replace(QualitySettings.tiny(), loader_workers=getattr(args, "loader_workers", None) or 0)
    if getattr(args, "scale", "cpu") == "gpu":
        gpu = QualitySettings.gpu(models=tuple(args.models), methods=tuple(args.methods),
                                  sparsities=tuple(args.sparsities), tasks=tuple(args.tasks),
                                  world_seed=args.world_seed, pattern=args.pattern)
        for model, task, name, value in args.budget:
            set_budget(gpu.budgets, model, task, name, value)
        return gpu if args.loader_workers is None else replace(gpu, loader_workers=args.loader_workers)
    return QualitySettings(
        models=tuple(args.models), methods=tuple(args.methods), sparsities=tuple(args.sparsities),
        seeds=tuple(args.seeds), tasks=tuple(args.tasks), world_seed=args.world_seed, sizes=args.world_sizes,
        image_size=args.image_size, patch_size=args.patch_size, hidden_size=args.hidden_size, layers=args.layers,
        heads=args.heads, pretrain_epochs=args.pretrain_epochs, pretrain_lrs=({m: args.pretrain_lr for m in MODELS} if args.pretrain_lr else QualitySettings().pretrain_lrs),
        pretrain_batch_size=args.pretrain_batch_size, budgets=budgets_from_args(args),
        calibration_batches=args.calibration_batches, calibration_batch_size=args.calibration_batch_size,
        k_test=args.k_test, pattern=args.pattern, loader_workers=args.loader_workers or 0)


def main(args: argparse.Namespace) -> dict[str, Any]:
    quiet_libraries()
    jobs = getattr(args, "jobs", 1)
    if jobs < 0:
        raise SystemExit(f"--jobs must be >= 0 (0: the free cores), got {jobs}")
    free = free_cores()  # samples the machine's load for 0.5 s: once
    jobs = jobs or (1 if torch.cuda.is_available() else free)
    torch.set_num_threads(args.threads or free)  # with --jobs, for pretraining (workers take one each)
    settings = settings_from_args(args)
    plan = optimizer_steps(settings)
    print(f"[quality] {torch.get_num_threads()} torch thread(s), {jobs} job(s); grid: {len(grid(settings))} backbones x "
          f"{len(settings.tasks)} tasks x {len(settings.seeds)} seeds = {plan['fine_tunings']} fine-tunings, "
          f"{plan['fine_tuning_steps']:,} optimizer steps (pretraining: "
          + ", ".join(f"{m} {n:,}" for m, n in plan["pretrain_steps"].items()) + ")", flush=True)
    if getattr(args, "plan", False):
        print(json.dumps({"settings": asdict(settings), **plan}, indent=1, default=str))
        return plan
    return run_benchmark(args.out, args.cache_dir, settings, log=lambda m: print(m, flush=True), jobs=jobs)
