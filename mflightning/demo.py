"""The offline demo: prune a small pretrained BLIP once with MultiFlow, fine-tune it on three tasks.

    python -m mflightning.demo [--out outputs/demo] [--cache-dir outputs/cache] [--small]

1. generate (or reuse) the synthetic shapes world (`mflightning.data.generate_world`);
2. pretrain a small BLIP on its caption split with ITC + ITM + LM (or load the cached model);
3. prune it ONCE with MultiFlow at 75% sparsity on the calibration split (task-agnostic);
4. fine-tune the sparse backbone and a dense copy on retrieval, captioning and VQA of the world
   (the same mask file for every task, kept sparse by MultiFlowCallback);
5. print a table (task, metric, image-blind chance level, dense, pruned, realised sparsity per
   modality) and write the masks, metrics JSON and a layer-wise sparsity plot into `--out`.

"chance" and "blind" (an image-blind baseline) are defined in `mflightning.baselines`. The
model, its pretraining cache and the task modules come from the "blip" family of
`mflightning.families`, which the quality benchmark (`mflightning.bench.quality`) shares.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mflightning.baselines import (  # noqa: F401  (the chance levels are importable from here as before)
    CHANCE_DEFINITION,
    chance_and_blind,
    retrieval_chance,
    vqa_blind_prior,
    vqa_chance,
)
from mflightning.bench.quality_settings import QualitySettings
from mflightning.data.synthetic import WorldSizes, generate_world
from mflightning.families import (
    TASKS,
    ModelSize,
    TaskSettings,
    calibration_loader,
    finetune_task,
    get_family,
)
from mflightning.pretrain import PretrainConfig
from mflightning.runtime import free_cores, quiet_libraries

SPARSITY = 0.75
FAMILY = get_family("blip")  # the demo's backbone


# The demo is one cell of the quality benchmark (`mflightning.bench.quality`, world seed 0): its world,
# its small BLIP (ViT 2x64 on 32 px, patch 8; text 2x64) pretrained 60 epochs, calibration and BLIP
# fine-tuning budgets, dense and MultiFlow at 75%, fine-tuning seed 0. One difference, for VQA, the task
# nearest its image-blind prior: a test split of 200 images (600 questions; the benchmark's 60 images let
# a handful of questions decide one seed's margin). Over fine-tuning seeds 0-2 (one thread) the pruned
# model's VQA margin over the prior was +6.2 points (50.2-51.9 %) after 60 pretraining epochs, +7.0 after 90,
# which cost a minute more of a first run that should stay within 4 minutes.
BENCHMARK = QualitySettings()
DEMO_SIZES = replace(BENCHMARK.sizes, vqa_test=200)
DEMO_PRETRAIN_EPOCHS = 60
# Every computation on one thread: two threads gave other weights from run to run (pretraining differed by
# 0.05 after 90 epochs, and the table with it); one thread gives the same table on every run.
DEMO_THREADS = 1


@dataclass
class DemoSettings:
    """Every size of the demo; `small()` is the reduced mode used by the tests."""

    sizes: WorldSizes = field(default_factory=lambda: replace(DEMO_SIZES))
    world_seed: int = 0
    pretrain: PretrainConfig = field(
        default_factory=lambda: replace(BENCHMARK.pretrain_config(FAMILY), epochs=DEMO_PRETRAIN_EPOCHS))
    calibration_batches: int = BENCHMARK.calibration_batches
    calibration_batch_size: int = BENCHMARK.calibration_batch_size
    tasks: dict[str, TaskSettings] = field(
        default_factory=lambda: {task: replace(budget) for task, budget in BENCHMARK.budgets[FAMILY.name].items()})
    k_test: int = BENCHMARK.k_test
    seed: int = 0

    @classmethod
    def small(cls) -> "DemoSettings":
        """A few-second version: tiny world, tiny model, one epoch each (correct plumbing, not quality)."""
        backbone = FAMILY.small_config(ModelSize(hidden_size=32, layers=1, heads=2, image_size=32, patch_size=16))
        return cls(
            sizes=WorldSizes(calibration=24, train=12, val=4, test=6, vqa_train=12, vg=4, vqa_test=6,
                             questions_per_image=2),
            pretrain=PretrainConfig(backbone=backbone, epochs=1, batch_size=8, warmup_steps=0),
            calibration_batches=2, calibration_batch_size=8,
            tasks={name: TaskSettings(epochs=1, lr=1e-3, batch_size=8) for name in TASKS},
            k_test=4,
        )


# ---------------------------------------------------------------------------------------- tasks
@dataclass
class TaskRun:
    """One fine-tuning + test run."""

    task: str
    variant: str  # dense | pruned
    metrics: dict[str, float]
    sparsity: dict[str, float]
    seconds: float


def finetune_and_test(task: str, variant: str, backbone, vocab: str, world, settings: DemoSettings,
                      masks, out: Path, progress: bool = True, export_dir: Path | None = None,
                      base_checkpoint: str | None = None) -> TaskRun:
    """Fine-tune a copy of `backbone` on `task` (sparse when `masks` is given) and evaluate on the test split;
    `export_dir`: write the fine-tuned module there as a transformers model."""
    started = time.perf_counter()
    budget = settings.tasks[task]
    print(f"\n[demo] fine-tuning the {variant} model on {task} ({budget.epochs} epochs)", flush=True)
    metrics, sparsity = finetune_task(FAMILY, task, backbone, vocab, world, budget, seed=settings.seed,
                                      k_test=settings.k_test, image_size=settings.pretrain.image_size, masks=masks,
                                      output_dir=out / "results" / f"{task}_{variant}", root_dir=out / "lightning",
                                      accelerator="cpu", progress=progress, export_dir=export_dir,
                                      base_checkpoint=base_checkpoint)
    return TaskRun(task, variant, metrics, sparsity, round(time.perf_counter() - started, 1))


def caption_with_pipeline(model_dir: Path, world, prompt: str, module_captions: Path) -> dict[str, Any]:
    """Caption the first test image of the world with a transformers pipeline on the exported folder (the hand-off),
    beside the caption the fine-tuned module gave it (`module_captions`: its test results JSON)."""
    from PIL import Image
    from transformers import pipeline

    from mflightning.export.transformers_export import generation_settings

    record = json.loads(Path(world.caption_test).read_text())[0]
    image_path = Path(world.image_root) / record["image"]
    pipe = pipeline("image-text-to-text", model=str(model_dir))
    with Image.open(image_path) as image:
        output = pipe(images=image.convert("RGB"), text=prompt, generate_kwargs=generation_settings(pipe.model))
    caption = output[0]["generated_text"][len(output[0]["input_text"]):].strip()
    ours = {str(r["image_id"]): r["caption"] for r in json.loads(module_captions.read_text())}.get(image_path.stem)
    return {"image": str(image_path), "caption": caption, "module_caption": ours, "reference": record["caption"][0]}


# ---------------------------------------------------------------------------------------- report
METRIC_ROWS = (  # (task, metric key, label)
    ("retrieval", "txt_r1", "TR@1"),
    ("retrieval", "img_r1", "IR@1"),
    ("retrieval", "r_mean", "R mean"),
    ("captioning", "bleu4", "BLEU@4"),
    ("captioning", "cider", "CIDEr"),
    ("vqa", "vqa_acc", "accuracy"),
)


def results_table(runs: list[TaskRun], chance: dict[str, dict[str, float]],
                  blind: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Rows of the summary: task, metric, chance, image-blind baseline, dense, pruned, pruned sparsity per modality."""
    by = {(r.task, r.variant): r for r in runs}
    rows = []
    for task, key, label in METRIC_ROWS:
        dense, pruned = by.get((task, "dense")), by.get((task, "pruned"))
        if dense is None or pruned is None:
            continue
        rows.append({
            "task": task, "metric": label, "key": key, "chance": chance[task].get(key),
            "blind": blind[task].get(key), "dense": dense.metrics.get(key), "pruned": pruned.metrics.get(key),
            "sparsity": {g: v for g, v in pruned.sparsity.items()},
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The summary table as fixed-width text."""
    groups = sorted({g for r in rows for g in r["sparsity"] if g != "total"}) + ["total"]
    head = f"{'task':<11} {'metric':<9} {'chance':>7} {'blind':>7} {'dense':>7} {'pruned':>7}  " + " ".join(
        f"{'sp. ' + g:>11}" for g in groups)
    lines = [head, "-" * len(head)]
    fmt = lambda v: f"{v:7.2f}" if isinstance(v, (int, float)) else f"{'-':>7}"  # noqa: E731
    for r in rows:
        sp = " ".join(f"{r['sparsity'].get(g, float('nan')):>11.1%}" for g in groups)
        lines.append(f"{r['task']:<11} {r['metric']:<9} {fmt(r['chance'])} {fmt(r['blind'])} {fmt(r['dense'])} "
                     f"{fmt(r['pruned'])}  {sp}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main flow
def run_demo(out: str | os.PathLike = "outputs/demo", cache_dir: str | os.PathLike = "outputs/cache",
             settings: DemoSettings | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the whole demo; returns (and writes to out/metrics.json) the table rows and timings."""
    from mflightning.plots import plot_layer_sparsity
    from mflightning.pruning import prune

    settings = settings or DemoSettings()
    out, cache_dir = Path(out), Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    image_size = settings.pretrain.image_size
    world_dir = cache_dir / "world"  # regenerated when seed, sizes or image size differ from its world.json
    print(f"[demo] synthetic world: {world_dir}", flush=True)
    world = generate_world(world_dir, seed=settings.world_seed, sizes=settings.sizes, image_size=image_size)
    timings["world"] = round(time.perf_counter() - t0, 1)

    t = time.perf_counter()
    print("[demo] pretraining the small BLIP (ITC + ITM + LM) on the caption split, or loading it from the cache",
          flush=True)
    model_dir = FAMILY.pretrain(world.root, cache_dir, settings.pretrain, progress=progress)
    backbone, vocab, pretrain_record = FAMILY.load(model_dir)
    _copy_tree(model_dir, out / "pretrained")  # a stable path for recipes/synthetic/*.yaml
    timings["pretrain"] = round(time.perf_counter() - t, 1)
    print(f"[demo] pretrained model: {model_dir} (epoch losses {pretrain_record['epoch_losses']})", flush=True)

    t = time.perf_counter()
    print(f"[demo] pruning ONCE with MultiFlow at {SPARSITY:.0%} on {settings.calibration_batches} calibration "
          "batches (task-agnostic: no task data)", flush=True)
    calibration = calibration_loader(world, vocab, image_size=image_size, batch_size=settings.calibration_batch_size,
                                     max_length=settings.pretrain.max_length, seed=settings.seed)
    result = prune(backbone, sparsity=SPARSITY, method="multiflow", calibration=calibration,
                   num_batches=settings.calibration_batches, progress=progress)
    masks_path = result.save(out / "masks.safetensors")
    result.save(out / "scores.safetensors", include_scores=True)
    (out / "pruning_report.txt").write_text(result.report() + "\n")
    ablations = {
        "MultiFlow": result,
        "w/o multimodality (magnitude ratios)": replace(result, allocation="magnitude").at(SPARSITY),
        "w/o distribution (global top-k)": replace(result, allocation="global").at(SPARSITY),
    }
    plot_path = plot_layer_sparsity(ablations, out / "layer_sparsity.png",
                                    title=f"Layer-wise sparsity of the demo BLIP at {SPARSITY:.0%}")
    timings["prune"] = round(time.perf_counter() - t, 1)
    print(f"[demo] realised sparsity {result.sparsity:.2%}, per modality "
          + ", ".join(f"{g} {s:.2%}" for g, s in result.group_sparsity().items()), flush=True)

    runs: list[TaskRun] = []
    export_dir = out / "transformers_captioning"  # the pruned captioning model, for transformers
    shutil.rmtree(export_dir, ignore_errors=True)
    for task in TASKS:
        for variant in ("dense", "pruned"):
            exported = task == "captioning" and variant == "pruned"
            run = finetune_and_test(task, variant, backbone, vocab, world, settings,
                                    result if variant == "pruned" else None, out, progress,
                                    export_dir=export_dir if exported else None, base_checkpoint=str(model_dir))
            runs.append(run)
            timings[f"{task}_{variant}"] = run.seconds
            print(f"[demo] {task} {variant}: " + ", ".join(f"{k} {v:.2f}" for k, v in run.metrics.items()), flush=True)

    t = time.perf_counter()
    prompt = inspect.signature(FAMILY.task_classes["captioning"]).parameters["prompt"].default  # the module's
    module_captions = out / "results" / "captioning_pruned" / "test_captions.json"
    handoff = caption_with_pipeline(export_dir, world, prompt, module_captions)
    timings["transformers_pipeline"] = round(time.perf_counter() - t, 1)

    chance, blind = chance_and_blind(world, settings.seed)
    rows = results_table(runs, chance, blind)
    timings["total"] = round(time.perf_counter() - t0, 1)
    table = format_table(rows)
    summary = {
        "sparsity_target": SPARSITY,
        "sparsity_realised": result.sparsity,
        "sparsity_per_modality": result.group_sparsity(),
        "table": rows,
        "runs": [asdict(r) for r in runs],
        "chance": chance,
        "blind": blind,
        "chance_definition": CHANCE_DEFINITION,
        "timings_s": timings,
        "settings": asdict(settings),
        "pretrained_model": str(model_dir),
        "files": {"masks": str(masks_path), "scores": str(out / "scores.safetensors"),
                  "plot": str(plot_path), "report": str(out / "pruning_report.txt"),
                  "transformers_captioning": str(export_dir)},
        "transformers_pipeline": handoff,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print("\n" + table)
    print(f"\n{CHANCE_DEFINITION}")
    print(f"pruned once with MultiFlow ({result.sparsity:.2%} of prunable weights); the same masks served all tasks")
    print(f"wrote {masks_path}, {out / 'metrics.json'}, {plot_path}")
    print(f"exported the pruned captioning model for transformers: {export_dir} (BlipForConditionalGeneration, "
          "BlipProcessor, model card, masks)")
    print(f"transformers pipeline('image-text-to-text') on {handoff['image']}: {handoff['caption']!r} "
          f"({'the same as' if handoff['caption'] == handoff['module_caption'] else 'NOT'} the module's caption; "
          f"a reference: {handoff['reference']!r})")
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return summary


def _copy_tree(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="MultiFlow offline demo on the synthetic shapes world")
    parser.add_argument("--out", default="outputs/demo", help="output folder (masks, metrics.json, plot)")
    parser.add_argument("--cache-dir", default="outputs/cache", help="where the world and the pretrained model are kept")
    parser.add_argument("--small", action="store_true", help="reduced sizes (seconds; plumbing check, not quality)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--threads", type=int, default=DEMO_THREADS,
                        help="torch threads for pruning and fine-tuning (default 1: the same table on every run; "
                             "more threads reorder sums, so tables may differ); pretraining always runs on one")
    args = parser.parse_args(argv)
    quiet_libraries()
    threads = args.threads if args.threads > 0 else free_cores()
    torch.set_num_threads(threads)
    print(f"[demo] {threads} torch thread(s) ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})", flush=True)
    settings = DemoSettings.small() if args.small else DemoSettings()
    return run_demo(args.out, args.cache_dir, settings, progress=not args.no_progress)


if __name__ == "__main__":
    main()
