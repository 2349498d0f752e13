"""The offline demo: prune a small pretrained BLIP once with MultiFlow, fine-tune it on three tasks.

    python -m mflightning.demo [--out outputs/demo] [--cache-dir outputs/cache] [--small]

1. generate (or reuse) the synthetic shapes world (`mflightning.data.generate_world`);
2. pretrain a small BLIP on its caption split with ITC + ITM + LM (or load the cached model);
3. prune it ONCE with MultiFlow at 75% sparsity on the calibration split (task-agnostic);
4. fine-tune the sparse backbone and a dense copy on retrieval, captioning and VQA of the world
   (the same mask file for every task, kept sparse by MultiFlowCallback);
5. print a table (task, metric, image-blind chance level, dense, pruned, realised sparsity per
   modality) and write the masks, metrics JSON and a layer-wise sparsity plot into `--out`.

"chance" is random guessing: a random ranking for retrieval (exact expectation), the caption of
another image for captioning, a uniformly random answer among those the question's type admits
for VQA (exact expectation). "blind" is an image-blind baseline: the same for retrieval and
captioning, and for VQA the most frequent training answer of the question's type (its first
two words), which language priors alone reach.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import shutil
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from math import comb
from pathlib import Path
from typing import Any

import torch

from mflightning.data import CalibrationDataModule, CaptionDataModule, RetrievalDataModule, VQADataModule
from mflightning.data.synthetic import WorldSizes, generate_world
from mflightning.data.transforms import build_test_transform
from mflightning.pretrain import SMALL_BACKBONE, PretrainConfig, load_pretrained, pretrain

SPARSITY = 0.75
CHANCE_DEFINITION = (
    "chance: random ranking (retrieval), another image's caption (captioning), a random answer of the question's "
    "type (VQA); blind: the best image-blind guess, here the same except VQA, which answers each question type's "
    "most frequent training answer"
)
TASKS = ("retrieval", "captioning", "vqa")


@dataclass
class TaskSettings:
    """Fine-tuning settings of one task (the same for the dense and the pruned model)."""

    epochs: int
    lr: float
    batch_size: int = 48


@dataclass
class DemoSettings:
    """Every size of the demo; `small()` is the reduced mode used by the tests."""

    sizes: WorldSizes = field(default_factory=WorldSizes)
    world_seed: int = 0
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    calibration_batches: int = 32
    calibration_batch_size: int = 32
    tasks: dict[str, TaskSettings] = field(default_factory=lambda: {
        "retrieval": TaskSettings(epochs=2, lr=2e-4),
        "captioning": TaskSettings(epochs=2, lr=3e-4),
        "vqa": TaskSettings(epochs=5, lr=5e-4),
    })
    k_test: int = 16
    seed: int = 0

    @classmethod
    def small(cls) -> "DemoSettings":
        """A few-second version: tiny world, tiny model, one epoch each (correct plumbing, not quality)."""
        backbone = copy.deepcopy(SMALL_BACKBONE)
        for part in ("text_config", "vision_config"):
            backbone[part].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        backbone["text_config"]["encoder_hidden_size"] = 32
        backbone["vision_config"].update(image_size=32, patch_size=16)
        backbone["image_text_hidden_size"] = 16
        return cls(
            sizes=WorldSizes(calibration=24, train=12, val=4, test=6, vqa_train=12, vg=4, vqa_test=6,
                             questions_per_image=2),
            pretrain=PretrainConfig(backbone=backbone, epochs=1, batch_size=8, warmup_steps=0),
            calibration_batches=2, calibration_batch_size=8,
            tasks={name: TaskSettings(epochs=1, lr=1e-3, batch_size=8) for name in TASKS},
            k_test=4,
        )


# ---------------------------------------------------------------------------------------- chance levels
def retrieval_chance(test_json: str | os.PathLike, k: int = 1) -> dict[str, float]:
    """Expected R@k (in %) of a random ranking: text retrieval (any of the image's captions) and image retrieval."""
    records = json.loads(Path(test_json).read_text())
    counts = [len(r["caption"]) for r in records]
    n_images, n_texts = len(counts), sum(counts)
    k_txt, k_img = min(k, n_texts), min(k, n_images)
    # P(at least one of c correct texts in the top k of n_texts) = 1 - C(n - c, k) / C(n, k)
    txt = sum(1 - comb(n_texts - c, k_txt) / comb(n_texts, k_txt) for c in counts) / n_images
    img = k_img / n_images
    return {f"txt_r{k}": 100 * txt, f"img_r{k}": 100 * img}


def captioning_chance(test_json: str | os.PathLike, seed: int = 0) -> dict[str, float]:
    """Caption scores of an image-blind captioner: each image gets the first caption of another image."""
    from mflightning.metrics import caption_scores

    records = json.loads(Path(test_json).read_text())
    if len(records) < 2:
        raise ValueError(f"{test_json}: captioning chance needs at least two images")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}  # a cycle: never itself
    predictions = {str(i): records[other[i]]["caption"][0] for i in range(len(records))}
    references = {str(i): list(r["caption"]) for i, r in enumerate(records)}
    return caption_scores(predictions, references)


def question_type(question: str) -> str:
    """The question's first two words ("what color", "how many", "is there" ...)."""
    return " ".join(question.lower().split()[:2])


def _answers_by_type(train_jsons: list[str | os.PathLike]) -> dict[str, Counter]:
    by_type: dict[str, Counter] = defaultdict(Counter)
    for path in train_jsons:
        for record in json.loads(Path(path).read_text()):
            by_type[question_type(record["question"])].update(record["answer"])
    return by_type


def vqa_chance(train_jsons: list[str | os.PathLike], test_json: str | os.PathLike) -> dict[str, float]:
    """Expected VQA accuracy (in %) of a uniformly random answer among those its question type admits.

    A type's answers are the majority answers of its training questions ("what color": the six
    colours, "is there": yes/no ...); the expectation is exact (mean over those candidates).
    """
    from mflightning.metrics import vqa_question_accuracy

    candidates: dict[str, set[str]] = defaultdict(set)
    for path in train_jsons:
        for record in json.loads(Path(path).read_text()):
            candidates[question_type(record["question"])].add(Counter(record["answer"]).most_common(1)[0][0])
    everything = set().union(*candidates.values())
    test = json.loads(Path(test_json).read_text())
    total = 0.0
    for record in test:
        options = candidates.get(question_type(record["question"])) or everything
        total += sum(vqa_question_accuracy(a, record["answer"]) for a in options) / len(options)
    return {"vqa_acc": 100 * total / len(test)}


def vqa_blind_prior(train_jsons: list[str | os.PathLike], test_json: str | os.PathLike) -> dict[str, float]:
    """VQA accuracy (in %) of answering each test question with its type's most frequent training answer."""
    from mflightning.metrics import vqa_accuracy

    by_type = _answers_by_type(train_jsons)
    overall = sum(by_type.values(), Counter())
    test = json.loads(Path(test_json).read_text())
    predictions = [(by_type.get(question_type(r["question"])) or overall).most_common(1)[0][0] for r in test]
    return {"vqa_acc": vqa_accuracy(predictions, [r["answer"] for r in test])}


# ---------------------------------------------------------------------------------------- tasks
@dataclass
class TaskRun:
    """One fine-tuning + test run."""

    task: str
    variant: str  # dense | pruned
    metrics: dict[str, float]
    sparsity: dict[str, float]
    seconds: float


def full_view(datamodule_class: type) -> type:
    """The datamodule class with training images resized whole instead of randomly cropped.

    Captions and questions of the synthetic world name every object and where it lies; a random
    crop (scale 0.5-1) cuts objects out and moves them, making its labels wrong.
    """

    class FullView(datamodule_class):
        def train_transform(self):
            return build_test_transform(self.image_size)

    FullView.__name__ = FullView.__qualname__ = f"FullView{datamodule_class.__name__}"
    return FullView


def task_datamodule(task: str, world, settings: DemoSettings) -> Any:
    """The world's datamodule for one task, on whole images at the pretrained model's size."""
    image_size = settings.pretrain.image_size
    common = dict(image_root=world.image_root, tokenizer=world.vocab, image_size=image_size,
                  batch_size=settings.tasks[task].batch_size, eval_batch_size=64, num_workers=0, augment=False,
                  hflip=False, seed=settings.seed)
    if task == "retrieval":
        return full_view(RetrievalDataModule)(train_json=world.retrieval_train, test_json=world.retrieval_test, max_length=30,
                                   **common)
    if task == "captioning":
        return full_view(CaptionDataModule)(train_json=world.caption_train, test_json=world.caption_test, max_length=30, **common)
    return full_view(VQADataModule)(train_json=[world.vqa_train, world.vg_train], test_json=world.vqa_test,
                         answer_list_json=world.answer_list, max_length=20, answer_max_length=6, **common)


def task_module(task: str, backbone, vocab: str, settings: DemoSettings) -> Any:
    """A BLIP task module for one task around the (pretrained) backbone, with the demo's settings."""
    from mflightning.tasks import CaptioningModule, RetrievalModule, VQAModule

    common = dict(backbone=copy.deepcopy(backbone), tokenizer=vocab, lr=settings.tasks[task].lr,
                  weight_decay=0.05, warmup_steps=10)
    if task == "retrieval":
        return RetrievalModule(k_test=settings.k_test, **common)
    if task == "captioning":
        return CaptioningModule(num_beams=3, min_length=5, max_length=24, **common)
    return VQAModule(answer_list=None, k_test=128, **common)


def finetune_and_test(task: str, variant: str, backbone, vocab: str, world, settings: DemoSettings,
                      masks, out: Path, progress: bool = True) -> TaskRun:
    """Fine-tune a copy of `backbone` on `task` (sparse when `masks` is given) and evaluate on the test split."""
    import lightning as L

    from mflightning.callback import MultiFlowCallback

    L.seed_everything(settings.seed, workers=True, verbose=False)
    started = time.perf_counter()
    module = task_module(task, backbone, vocab, settings)
    module.output_dir = str(out / "results" / f"{task}_{variant}")
    data = task_datamodule(task, world, settings)
    callbacks = []
    pruning = None
    if masks is not None:
        pruning = MultiFlowCallback(masks=masks)
        callbacks.append(pruning)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=settings.tasks[task].epochs, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=str(out / "lightning"),
    )
    print(f"\n[demo] fine-tuning the {variant} model on {task} ({settings.tasks[task].epochs} epochs)", flush=True)
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, verbose=False)
    sparsity = pruning.measured_sparsity(module) if pruning is not None else {}
    return TaskRun(task, variant, dict(module.eval_results["test"]), sparsity,
                   round(time.perf_counter() - started, 1))


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
    model_dir = pretrain(world.root, cache_dir, settings.pretrain, progress=progress)
    backbone, vocab = load_pretrained(model_dir)
    _copy_tree(model_dir, out / "pretrained")  # a stable path for recipes/synthetic/*.yaml
    pretrain_record = json.loads((model_dir / "pretrain.json").read_text())
    timings["pretrain"] = round(time.perf_counter() - t, 1)
    print(f"[demo] pretrained model: {model_dir} (epoch losses {pretrain_record['epoch_losses']})", flush=True)

    t = time.perf_counter()
    print(f"[demo] pruning ONCE with MultiFlow at {SPARSITY:.0%} on {settings.calibration_batches} calibration "
          "batches (task-agnostic: no task data)", flush=True)
    calibration = CalibrationDataModule(
        calibration_json=world.calibration, image_root=world.image_root, tokenizer=vocab, image_size=image_size,
        batch_size=settings.calibration_batch_size, num_workers=0, max_length=settings.pretrain.max_length,
        seed=settings.seed,
    ).calibration_dataloader()
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
    for task in TASKS:
        for variant in ("dense", "pruned"):
            run = finetune_and_test(task, variant, backbone, vocab, world, settings,
                                    result if variant == "pruned" else None, out, progress)
            runs.append(run)
            timings[f"{task}_{variant}"] = run.seconds
            print(f"[demo] {task} {variant}: " + ", ".join(f"{k} {v:.2f}" for k, v in run.metrics.items()), flush=True)

    vqa_train = [world.vqa_train, world.vg_train]
    chance = {
        "retrieval": {**retrieval_chance(world.retrieval_test, 1), "r_mean": _chance_r_mean(world.retrieval_test)},
        "captioning": captioning_chance(world.caption_test, settings.seed),
        "vqa": vqa_chance(vqa_train, world.vqa_test),
    }
    # image-blind baselines: a random ranking and another image's caption are already blind
    blind = {**chance, "vqa": vqa_blind_prior(vqa_train, world.vqa_test)}
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
                  "plot": str(plot_path), "report": str(out / "pruning_report.txt")},
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print("\n" + table)
    print(f"\n{CHANCE_DEFINITION}")
    print(f"pruned once with MultiFlow ({result.sparsity:.2%} of prunable weights); the same masks served all tasks")
    print(f"wrote {masks_path}, {out / 'metrics.json'}, {plot_path}")
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return summary


def _chance_r_mean(test_json: str | os.PathLike) -> float:
    """Chance of BLIP's `r_mean` (mean of text and image R@1, R@5, R@10)."""
    values = [retrieval_chance(test_json, k) for k in (1, 5, 10)]
    txt = sum(v[f"txt_r{k}"] for v, k in zip(values, (1, 5, 10))) / 3
    img = sum(v[f"img_r{k}"] for v, k in zip(values, (1, 5, 10))) / 3
    return (txt + img) / 2


def _copy_tree(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)


def free_cores(window: float = 0.5) -> int:
    """Cores not taken by other processes right now, at least 1.

    Two threads on a two-core machine where another process keeps one core busy run several
    times slower than one thread (the threads wait for each other at every operation). The busy
    share is sampled from /proc/stat over `window` seconds: the 1-minute load average would still
    count, say, the pip install that `make demo` ran just before.
    """
    cores = os.cpu_count() or 1

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as handle:
                fields = [int(v) for v in handle.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    first = sample()
    if first is None:
        try:
            return max(1, min(cores, round(cores - os.getloadavg()[0])))
        except OSError:
            return cores
    time.sleep(window)
    second = sample()
    total, idle = second[0] - first[0], second[1] - first[1]  # type: ignore[index]
    busy = cores * (1 - idle / total) if total > 0 else 0.0
    return max(1, min(cores, round(cores - busy)))


def quiet_libraries() -> None:
    """Keep the console to progress bars and the demo's own lines."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)`.*")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="MultiFlow offline demo on the synthetic shapes world")
    parser.add_argument("--out", default="outputs/demo", help="output folder (masks, metrics.json, plot)")
    parser.add_argument("--cache-dir", default="outputs/cache", help="where the world and the pretrained model are kept")
    parser.add_argument("--small", action="store_true", help="reduced sizes (seconds; plumbing check, not quality)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: the cores not busy with other processes, at least 1)")
    args = parser.parse_args(argv)
    quiet_libraries()
    threads = args.threads or free_cores()
    torch.set_num_threads(threads)
    print(f"[demo] {threads} torch thread(s) ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})", flush=True)
    settings = DemoSettings.small() if args.small else DemoSettings()
    return run_demo(args.out, args.cache_dir, settings, progress=not args.no_progress)


if __name__ == "__main__":
    main()
