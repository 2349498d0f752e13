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
  underlined) and `quality_<task>.png` (metric against sparsity, one line per method).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from mflightning.data.synthetic import WorldSizes, generate_world
from mflightning.demo import DemoSettings, TaskSettings, free_cores, quiet_libraries, task_datamodule, task_module
from mflightning.pretrain import SMALL_BACKBONE, LossHistory, PretrainConfig, cache_key, load_pretrained, pretrain

MODELS = ("blip", "xvlm")
TASKS = ("retrieval", "captioning", "vqa")
XVLM_CACHE_VERSION = 2  # 2: pretrained on whole images (1: random calibration crops)
TASK_TITLES = {"retrieval": "Image-text retrieval", "captioning": "Image captioning", "vqa": "VQA"}


@dataclass(frozen=True)
class MethodSpec:
    """One row of the tables: a `prune()` method with its ablation switches."""

    label: str
    method: str | None  # None: the dense model
    allocation: str | None = None
    invert: bool = False


METHODS: dict[str, MethodSpec] = {
    "dense": MethodSpec("Dense", None),
    "random": MethodSpec("Random", "random"),
    "omp": MethodSpec("OMP", "omp"),
    "lamp": MethodSpec("LAMP", "lamp"),
    "snip": MethodSpec("SNIP", "snip"),
    "wanda": MethodSpec("Wanda", "wanda"),
    "multiflow": MethodSpec("MultiFlow", "multiflow"),
    "mf_no_multimodality": MethodSpec("MultiFlow w/o multimodality", "multiflow", allocation="magnitude"),
    "mf_no_distribution": MethodSpec("MultiFlow w/o distribution", "multiflow", allocation="global"),
    "mf_inverted": MethodSpec("MultiFlow w/ inversion", "multiflow", invert=True),
}

METRICS: dict[str, tuple[tuple[str, str], ...]] = {  # task -> (metric key, column label)
    "retrieval": (("txt_r1", "TR@1"), ("txt_r5", "TR@5"), ("img_r1", "IR@1"), ("img_r5", "IR@5")),
    "captioning": (("bleu4", "BLEU@4"), ("cider", "CIDEr")),
    "vqa": (("vqa_acc", "VQA acc"),),
}


@dataclass
class QualitySettings:
    """Everything the results depend on (written to settings.json; a resumed run must match it)."""

    models: tuple[str, ...] = MODELS
    methods: tuple[str, ...] = tuple(METHODS)
    sparsities: tuple[float, ...] = (0.63, 0.75, 0.9)
    seeds: tuple[int, ...] = (0, 1)
    tasks: tuple[str, ...] = TASKS
    world_seed: int = 0
    sizes: WorldSizes = field(default_factory=lambda: WorldSizes(
        calibration=800, train=160, val=1, test=60, vqa_train=160, vg=60, vqa_test=60, questions_per_image=3))
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    layers: int = 2  # per encoder (BLIP: vision, text; XVLM: vision, text, fusion)
    heads: int = 2
    pretrain_epochs: int = 20
    pretrain_lr: float = 1e-3
    pretrain_batch_size: int = 32
    epochs: int = 3  # retrieval and captioning
    vqa_epochs: int = 8  # VQA learns slowest (at 3 epochs it stays far below the image-blind baseline)
    lr: float = 5e-4
    batch_size: int = 32
    calibration_batches: int = 8
    calibration_batch_size: int = 32
    k_test: int = 16

    def __post_init__(self) -> None:
        for name, allowed in (("models", MODELS), ("methods", tuple(METHODS)), ("tasks", TASKS)):
            values = tuple(getattr(self, name))
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"--{name}: unknown or empty {bad or values}; choose from {list(allowed)}")
            setattr(self, name, values)
        self.sparsities = tuple(float(s) for s in self.sparsities)
        bad = [s for s in self.sparsities if not 0.0 < s < 1.0]
        if bad or not self.sparsities:
            raise ValueError(f"--sparsities must be in (0, 1), got {list(self.sparsities)}")
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        if self.image_size % self.patch_size:
            raise ValueError(f"--image-size {self.image_size} must be a multiple of --patch-size {self.patch_size}")
        for name in ("hidden_size", "layers", "heads", "pretrain_epochs", "epochs", "vqa_epochs", "batch_size",
                     "calibration_batches", "calibration_batch_size", "k_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def tiny(cls) -> "QualitySettings":
        """Seconds-long plumbing check (tests): minimal world and model, one epoch."""
        return cls(models=("blip",), methods=("dense", "multiflow"), sparsities=(0.75,), seeds=(0,),
                   sizes=WorldSizes(calibration=16, train=8, val=1, test=4, vqa_train=8, vg=2, vqa_test=4,
                                    questions_per_image=1),
                   hidden_size=32, layers=1, patch_size=16, pretrain_epochs=1, epochs=1, vqa_epochs=1, batch_size=8,
                   calibration_batches=1, calibration_batch_size=8, pretrain_batch_size=8, k_test=4)


# ---------------------------------------------------------------------------------------- models
def blip_backbone_config(s: QualitySettings) -> dict:
    """SMALL_BACKBONE resized by the settings (hidden width, layers, heads, image and patch size)."""
    config = copy.deepcopy(SMALL_BACKBONE)
    for part in ("text_config", "vision_config"):
        config[part].update(hidden_size=s.hidden_size, intermediate_size=2 * s.hidden_size,
                            num_hidden_layers=s.layers, num_attention_heads=s.heads)
    config["text_config"]["encoder_hidden_size"] = s.hidden_size
    config["vision_config"].update(image_size=s.image_size, patch_size=s.patch_size)
    config["image_text_hidden_size"] = max(8, s.hidden_size // 2)
    return config


def xvlm_backbone_config(s: QualitySettings) -> dict:
    """A small XVLM: timm ViT of `layers` blocks, `layers` text + `layers` fusion layers, as wide as the ViT."""
    vision = dict(patch_size=s.patch_size, embed_dim=s.hidden_size, depth=s.layers, num_heads=s.heads, pre_norm=True)
    return dict(hidden_size=s.hidden_size, num_attention_heads=s.heads, intermediate_size=2 * s.hidden_size,
                num_text_layers=s.layers, num_fusion_layers=s.layers, max_position_embeddings=40,
                vision_model=None, vision_kwargs=vision, image_size=s.image_size, embed_dim=max(8, s.hidden_size // 2))


def pretrain_config(model: str, s: QualitySettings) -> PretrainConfig:
    """The pretraining config of `model` (its `backbone` dict is the model's own config format)."""
    backbone = blip_backbone_config(s) if model == "blip" else xvlm_backbone_config(s)
    return PretrainConfig(backbone=backbone, epochs=s.pretrain_epochs, batch_size=s.pretrain_batch_size,
                          lr=s.pretrain_lr, warmup_steps=20)


def pretrain_xvlm(world_root: str | os.PathLike, cache_dir: str | os.PathLike, config: PretrainConfig,
                  progress: bool = False) -> Path:
    """Pretrain the small XVLM on the caption split with ITC + ITM + MLM (cached like `mflightning.pretrain`)."""
    import lightning as L

    from mflightning.pretrain import caption_loader, read_manifest
    from mflightning.tasks.xvlm_tasks import XVLMTaskModule

    class XVLMPretrainModule(XVLMTaskModule):
        """XVLM pretraining: its `pruning_loss` (ITC + ITM + MLM) is the training loss."""

        def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
            loss = self.pruning_loss(batch)
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].size(0))
            return loss

    manifest = read_manifest(world_root)
    target = Path(cache_dir) / f"xvlm-pretrained-v{XVLM_CACHE_VERSION}-{cache_key(manifest, config)}"
    if (target / "pretrain.json").is_file():
        return target
    started = time.perf_counter()
    L.seed_everything(config.seed, workers=True, verbose=False)
    vocab = Path(world_root) / "vocab.txt"
    # The BLIP pretraining's whole-image caption loader; it reads the image size from a BLIP-shaped backbone dict.
    loader_config = replace(config, backbone={"vision_config": {"image_size": int(config.backbone["image_size"])}})
    data = caption_loader(Path(world_root) / "calibration.json", Path(world_root) / "images", str(vocab),
                          loader_config)
    module = XVLMPretrainModule(backbone=copy.deepcopy(config.backbone), tokenizer=str(vocab), lr=config.lr,
                                weight_decay=config.weight_decay)
    history = LossHistory()
    trainer = L.Trainer(accelerator="auto", devices=1, max_epochs=config.epochs, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                        callbacks=[history], default_root_dir=str(Path(cache_dir) / "lightning"))
    trainer.fit(module, train_dataloaders=data)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    module.backbone.save_pretrained(partial)
    shutil.copyfile(vocab, partial / "vocab.txt")
    record = {"world": manifest, "config": asdict(config), "seconds": round(time.perf_counter() - started, 1),
              "epoch_losses": history.epoch_losses}
    (partial / "pretrain.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def load_model(model: str, model_dir: Path):
    """(backbone, vocab path, pretraining record) of a cached pretrained model."""
    record = json.loads((model_dir / "pretrain.json").read_text())
    if model == "blip":
        backbone, vocab = load_pretrained(model_dir)
        return backbone, vocab, record
    from mflightning.models.xvlm import XVLMBackbone

    return XVLMBackbone.from_pretrained(model_dir), str(model_dir / "vocab.txt"), record


def pruning_loss_fn(model: str, backbone, vocab: str) -> Callable:
    """`loss(model, batch)` for SNIP: the model's pretraining loss (BLIP ITC+ITM+LM, XVLM ITC+ITM+MLM)."""
    if model == "blip":
        from mflightning.pretrain import PretrainModule

        holder = PretrainModule(backbone=backbone, tokenizer=vocab)
    else:
        from mflightning.tasks.xvlm_tasks import XVLMTaskModule

        holder = XVLMTaskModule(backbone=backbone, tokenizer=vocab)
    if holder.backbone is not backbone:
        raise RuntimeError("the SNIP loss must run the backbone being pruned, not a copy")
    return lambda _model, batch: holder.pruning_loss(batch)


# ---------------------------------------------------------------------------------------- one run
def demo_settings(model: str, s: QualitySettings, seed: int) -> DemoSettings:
    """The demo's settings object for the shared datamodule/module builders (same sizes for every task)."""
    return DemoSettings(sizes=s.sizes, world_seed=s.world_seed, pretrain=pretrain_config("blip", s),
                        calibration_batches=s.calibration_batches, calibration_batch_size=s.calibration_batch_size,
                        tasks={t: TaskSettings(epochs=task_epochs(t, s), lr=s.lr, batch_size=s.batch_size)
                               for t in TASKS},
                        k_test=s.k_test, seed=seed)


def captioning_module(model: str, backbone, vocab: str, s: QualitySettings):
    """The model's captioning module (beam 3, length 5-24) without METEOR, whose JVM start costs ~6 s per run."""
    from mflightning.tasks import CaptioningModule, XVLMCaptioningModule

    cls = CaptioningModule if model == "blip" else XVLMCaptioningModule
    return cls(backbone=copy.deepcopy(backbone), tokenizer=vocab, lr=s.lr, num_beams=3, min_length=5, max_length=24,
               meteor=False)


def task_epochs(task: str, s: QualitySettings) -> int:
    """Fine-tuning epochs of a task (`vqa_epochs` for VQA, `epochs` otherwise)."""
    return s.vqa_epochs if task == "vqa" else s.epochs


def xvlm_module(task: str, backbone, vocab: str, s: QualitySettings):
    """An XVLM retrieval or VQA module around a copy of the backbone."""
    from mflightning.tasks import XVLMRetrievalModule, XVLMVQAModule

    common = dict(backbone=copy.deepcopy(backbone), tokenizer=vocab, lr=s.lr)
    if task == "retrieval":
        return XVLMRetrievalModule(k_test=s.k_test, **common)
    return XVLMVQAModule(answer_list=None, k_test=128, **common)


def finetune(model: str, task: str, backbone, vocab: str, world, s: QualitySettings, seed: int, masks,
             work_dir: Path) -> dict[str, Any]:
    """Fine-tune a copy of `backbone` on `task` (kept sparse by `masks` when given); test metrics + sparsity."""
    import lightning as L

    from mflightning.callback import MultiFlowCallback

    settings = demo_settings(model, s, seed)
    L.seed_everything(seed, workers=True, verbose=False)
    if task == "captioning":
        module = captioning_module(model, backbone, vocab, s)
    else:
        module = task_module(task, backbone, vocab, settings) if model == "blip" else xvlm_module(task, backbone, vocab, s)
    module.output_dir = str(work_dir)
    data = task_datamodule(task, world, settings)
    callbacks = [MultiFlowCallback(masks=masks)] if masks is not None else []
    trainer = L.Trainer(accelerator="auto", devices=1, max_epochs=task_epochs(task, s), logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=str(work_dir))
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, verbose=False)
    sparsity = callbacks[0].measured_sparsity(module) if callbacks else {}
    return {"metrics": {k: float(v) for k, v in module.eval_results["test"].items()}, "realised_sparsity": sparsity}


# ---------------------------------------------------------------------------------------- the grid
def run_key(method: str, sparsity: float | None, seed: int) -> str:
    return f"{method}@{'0' if sparsity is None else f'{sparsity:g}'}-s{seed}"


def grid(s: QualitySettings) -> list[tuple[str, str, float | None]]:
    """(model, method, sparsity) of every pruned or dense backbone, dense once per model."""
    out = []
    for model in s.models:
        for method in s.methods:
            for sparsity in ([None] if METHODS[method].method is None else s.sparsities):
                out.append((model, method, sparsity))
    return out


def settings_fingerprint(s: QualitySettings) -> dict:
    """What a resumed run must share with the stored runs (the grid itself may grow)."""
    d = asdict(s)
    for name in ("models", "methods", "sparsities", "seeds", "tasks"):
        d.pop(name)
    return d


def compute_masks_for(model: str, method: str, sparsity: float, backbone, vocab: str, calibration, s: QualitySettings,
                      path: Path):
    """Prune the pretrained backbone ONCE for (method, sparsity), or load the cached masks."""
    from mflightning.pruning import PruningResult, prune

    if path.is_file():
        return PruningResult.load(path), 0.0
    spec = METHODS[method]
    started = time.perf_counter()
    loss = pruning_loss_fn(model, backbone, vocab) if spec.method in ("snip", "itersnip") else None
    result = prune(backbone, sparsity=sparsity, method=spec.method, calibration=calibration,
                   num_batches=s.calibration_batches, allocation=spec.allocation, invert=spec.invert, loss=loss,
                   keep_scores=False)
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    result.save(path)
    return result, seconds


def run_benchmark(out: str | os.PathLike, cache_dir: str | os.PathLike, s: QualitySettings,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the whole grid; write quality.json, quality.md and the plots; return the report."""
    from mflightning.data import CalibrationDataModule

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
    total_runs = len(grid(s)) * len(s.tasks) * len(s.seeds)
    done = 0
    for model in s.models:
        t = time.perf_counter()
        config = pretrain_config(model, s)
        model_dir = pretrain(world.root, cache_dir, config, progress=False) if model == "blip" \
            else pretrain_xvlm(world.root, cache_dir, config)
        backbone, vocab, record = load_model(model, model_dir)
        log(f"[quality] {model}: pretrained model {model_dir} (epoch losses {record['epoch_losses']}, "
            f"{time.perf_counter() - t:.0f}s)")
        calibration = CalibrationDataModule(
            calibration_json=world.calibration, image_root=world.image_root, tokenizer=vocab,
            image_size=s.image_size, batch_size=s.calibration_batch_size, num_workers=0, max_length=30,
            seed=0).calibration_dataloader()
        for _, method, sparsity in [g for g in grid(s) if g[0] == model]:
            masks = None
            for task in s.tasks:
                for seed in s.seeds:
                    done += 1
                    path = out / "runs" / model / task / f"{run_key(method, sparsity, seed)}.json"
                    if path.is_file():
                        log(f"[quality] {done}/{total_runs} {model} {task} {run_key(method, sparsity, seed)}: cached")
                        continue
                    mask_seconds = 0.0
                    if sparsity is not None and masks is None:
                        mask_path = out / "masks" / model / f"{method}@{sparsity:g}.safetensors"
                        masks, mask_seconds = compute_masks_for(model, method, sparsity, backbone, vocab,
                                                                calibration, s, mask_path)
                    t = time.perf_counter()
                    work = out / "work" / model / task / run_key(method, sparsity, seed)
                    result = finetune(model, task, backbone, vocab, world, s, seed, masks, work)
                    shutil.rmtree(work, ignore_errors=True)
                    row = {"model": model, "method": method, "sparsity": sparsity, "seed": seed, "task": task,
                           **result, "seconds": round(time.perf_counter() - t, 1),
                           "mask_seconds": round(mask_seconds, 2)}
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(row, indent=1) + "\n")
                    shown = ", ".join(f"{k} {result['metrics'][k]:.2f}" for k, _ in METRICS[task]
                                      if k in result["metrics"])
                    realised = result["realised_sparsity"].get("total")
                    log(f"[quality] {done}/{total_runs} {model} {task} {run_key(method, sparsity, seed)}: {shown}"
                        + (f" (sparsity {realised:.1%})" if realised is not None else "")
                        + f" [{row['seconds']:.1f}s, {time.perf_counter() - started:.0f}s total]")
    shutil.rmtree(out / "work", ignore_errors=True)
    runs = collect_runs(out, s)
    report = {"settings": asdict(s), "runs": runs, "summary": summarise(runs),
              "wall_seconds": round(time.perf_counter() - started, 1),  # this invocation (cached runs are skipped)
              "run_seconds_total": round(sum(r["seconds"] + r.get("mask_seconds", 0.0) for r in runs), 1)}
    (out / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "quality.md").write_text(markdown_tables(report["summary"], s) + "\n")
    plots = plot_quality(report["summary"], s, out)
    log(f"[quality] wrote {out / 'quality.json'}, {out / 'quality.md'}, " + ", ".join(str(p) for p in plots)
        + f" in {report['wall_seconds']:.0f}s")
    return report


def collect_runs(out: Path, s: QualitySettings) -> list[dict]:
    """The stored run records of the requested grid (a missing one is an error naming the file)."""
    runs = []
    for model, method, sparsity in grid(s):
        for task in s.tasks:
            for seed in s.seeds:
                path = out / "runs" / model / task / f"{run_key(method, sparsity, seed)}.json"
                if not path.is_file():
                    raise FileNotFoundError(f"run result {path} is missing")
                runs.append(json.loads(path.read_text()))
    return runs


# ---------------------------------------------------------------------------------------- summary
def summarise(runs: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds of every metric, per (model, task, method, sparsity)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["task"], r["method"], r["sparsity"]), []).append(r)
    out = []
    for (model, task, method, sparsity), rs in groups.items():
        metrics = {}
        for key, _ in METRICS[task]:
            values = [r["metrics"][key] for r in rs if key in r["metrics"]]
            if values:
                metrics[key] = {"mean": statistics.fmean(values),
                                "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
        realised = [r["realised_sparsity"]["total"] for r in rs if r["realised_sparsity"].get("total") is not None]
        out.append({"model": model, "task": task, "method": method, "sparsity": sparsity, "metrics": metrics,
                    "realised_sparsity": statistics.fmean(realised) if realised else 0.0, "seeds": len(rs)})
    return out


def _cell(stat: dict | None, mark: str = "") -> str:
    if stat is None:
        return "-"
    text = f"{stat['mean']:.2f}" + (f"±{stat['std']:.2f}" if stat["n"] > 1 else "")
    return {"best": f"**{text}**", "second": f"<u>{text}</u>"}.get(mark, text)


def markdown_tables(summary: list[dict], s: QualitySettings) -> str:
    """One table per (task, model): rows = methods, column groups = sparsity x the task's metrics."""
    by = {(e["model"], e["task"], e["method"], e["sparsity"]): e for e in summary}
    seeds = f"{len(s.seeds)} fine-tuning seed{'s' if len(s.seeds) > 1 else ''}"
    lines = [f"Mean{'±std' if len(s.seeds) > 1 else ''} over {seeds} ({', '.join(map(str, s.seeds))}). "
             "Best pruned value per column in **bold**, second <u>underlined</u> (ties share the mark); Dense is the unpruned upper "
             "bound (the same model in every sparsity group)."]
    for task in s.tasks:
        metrics = METRICS[task]
        for model in s.models:
            lines += ["", f"### {TASK_TITLES[task]}: {model.upper()}", ""]
            header = ["Method"] + [f"{lab} {sp:.0%}" for sp in s.sparsities for _, lab in metrics]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            marks: dict[tuple, str] = {}
            for sp in s.sparsities:
                for key, _ in metrics:
                    shown = {m: round(by[(model, task, m, sp)]["metrics"][key]["mean"], 2) for m in s.methods
                             if METHODS[m].method and key in by.get((model, task, m, sp), {}).get("metrics", {})}
                    top = sorted(set(shown.values()), reverse=True)[:2]  # ties (as displayed) share a mark
                    for m, value in shown.items():
                        if value in top:
                            marks[(m, sp, key)] = ("best", "second")[top.index(value)]
            for m in s.methods:
                cells = [METHODS[m].label]
                for sp in s.sparsities:
                    entry = by.get((model, task, m, None if METHODS[m].method is None else sp))
                    for key, _ in metrics:
                        stat = entry["metrics"].get(key) if entry else None
                        cells.append(_cell(stat, marks.get((m, sp, key), "")))
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_quality(summary: list[dict], s: QualitySettings, out: Path) -> list[Path]:
    """Per task: metric against sparsity (rows = models, columns = metrics), one line per method (Agg PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(e["model"], e["task"], e["method"], e["sparsity"]): e for e in summary}
    paths = []
    for task in s.tasks:
        metrics = METRICS[task]
        fig, axes = plt.subplots(len(s.models), len(metrics), figsize=(3.6 * len(metrics), 3.0 * len(s.models)),
                                 squeeze=False)
        for i, model in enumerate(s.models):
            for j, (key, label) in enumerate(metrics):
                ax = axes[i][j]
                for m in s.methods:
                    if METHODS[m].method is None:
                        entry = by.get((model, task, m, None))
                        if entry and key in entry["metrics"]:
                            ax.axhline(entry["metrics"][key]["mean"], color="black", ls="--", lw=1, label="Dense")
                        continue
                    xs, ys, es = [], [], []
                    for sp in s.sparsities:
                        stat = by.get((model, task, m, sp), {}).get("metrics", {}).get(key)
                        if stat is not None:
                            xs.append(100 * sp)
                            ys.append(stat["mean"])
                            es.append(stat["std"])
                    if xs:
                        ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, lw=1.2 if m != "multiflow" else 2.2,
                                    capsize=2, label=METHODS[m].label)
                ax.set_title(f"{model.upper()} {label}", fontsize=9)
                ax.set_xlabel("sparsity (%)", fontsize=8)
                ax.tick_params(labelsize=7)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(5, max(1, len(labels))), fontsize=7)
        fig.tight_layout(rect=(0, 0.12 if len(labels) > 5 else 0.07, 1, 1))
        path = out / f"quality_{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = QualitySettings()
    parser.add_argument("--out", default="outputs/bench/quality", help="output folder (runs, masks, JSON, tables, plots)")
    parser.add_argument("--cache-dir", default="outputs/cache", help="where worlds and pretrained models are kept")
    parser.add_argument("--tiny", action="store_true", help="seconds-long plumbing check (other size flags ignored)")
    parser.add_argument("--models", nargs="+", default=list(d.models), choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=list(d.methods), choices=list(METHODS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(d.sparsities))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds), help="fine-tuning seeds")
    parser.add_argument("--tasks", nargs="+", default=list(d.tasks), choices=TASKS)
    parser.add_argument("--world-seed", type=int, default=d.world_seed)
    parser.add_argument("--world-sizes", type=_sizes, default=d.sizes,
                        help="comma-separated WorldSizes overrides, e.g. calibration=4000,train=2000,test=500")
    for name in ("image_size", "patch_size", "hidden_size", "layers", "heads", "pretrain_epochs",
                 "pretrain_batch_size", "epochs", "vqa_epochs", "batch_size", "calibration_batches", "calibration_batch_size",
                 "k_test"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    parser.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr)
    parser.add_argument("--lr", type=float, default=d.lr, help="fine-tuning learning rate (every task)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: free cores)")


def settings_from_args(args: argparse.Namespace) -> QualitySettings:
    """QualitySettings from parsed flags (`--tiny`: `QualitySettings.tiny()`, the other flags ignored)."""
    if args.tiny:
        return QualitySettings.tiny()
    return QualitySettings(
        models=tuple(args.models), methods=tuple(args.methods), sparsities=tuple(args.sparsities),
        seeds=tuple(args.seeds), tasks=tuple(args.tasks), world_seed=args.world_seed, sizes=args.world_sizes,
        image_size=args.image_size, patch_size=args.patch_size, hidden_size=args.hidden_size, layers=args.layers,
        heads=args.heads, pretrain_epochs=args.pretrain_epochs, pretrain_lr=args.pretrain_lr,
        pretrain_batch_size=args.pretrain_batch_size, epochs=args.epochs, vqa_epochs=args.vqa_epochs, lr=args.lr, batch_size=args.batch_size,
        calibration_batches=args.calibration_batches, calibration_batch_size=args.calibration_batch_size,
        k_test=args.k_test)


def main(args: argparse.Namespace) -> dict[str, Any]:
    quiet_libraries()
    torch.set_num_threads(args.threads or free_cores())
    settings = settings_from_args(args)
    print(f"[quality] {torch.get_num_threads()} torch thread(s); grid: {len(grid(settings))} backbones x "
          f"{len(settings.tasks)} tasks x {len(settings.seeds)} seeds", flush=True)
    return run_benchmark(args.out, args.cache_dir, settings, log=lambda m: print(m, flush=True))
