"""Backbone families of the demo and the quality benchmark, and the builders both share.

A `BackboneFamily` says, for one backbone ("blip", "xvlm"), how its small model is configured
(`small_config`), pretrained and cached (`pretrain_class`, `cache_prefix`), loaded back
(`backbone_class`) and fine-tuned (`task_classes`, `finetune_options`). Families are registered
once by name with `register_family` (a second registration of a name is an error) and found with
`get_family`; code that runs a model takes its family instead of branching on the model's name.

The shared builders: `task_datamodule` (the synthetic world's datamodule of a task),
`calibration_loader` (the calibration batches a backbone is pruned on), `BackboneFamily.task_module`,
`fit_and_test` (fine-tune one task module, kept sparse by a mask file, and test it) and
`finetune_task` (seed, build the module and the datamodule, `fit_and_test`: one run of the demo or the
benchmark).

Cache keys do not change with this module: a BLIP folder is `pretrained-<cache_key>`, an XVLM one
`xvlm-pretrained-v<XVLM_CACHE_VERSION>-<cache_key>`, with `mflightning.pretrain.cache_key` of the world and config.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from mflightning.data import CalibrationDataModule, CaptionDataModule, RetrievalDataModule, VQADataModule
from mflightning.data.transforms import build_test_transform
from mflightning.models import BlipBackbone, XVLMBackbone
from mflightning.pretrain import (
    BLIP_CACHE_PREFIX,
    SMALL_BACKBONE,
    PretrainConfig,
    PretrainModule,
    XVLMPretrainModule,
    cached_model_dir,
    pretrain_cached,
    pretrain_record,
)
from mflightning.tasks import (
    CaptioningModule,
    RetrievalModule,
    VQAModule,
    XVLMCaptioningModule,
    XVLMRetrievalModule,
    XVLMVQAModule,
)

TASKS = ("retrieval", "captioning", "vqa")
XVLM_CACHE_VERSION = 4  # 4: + captioning LM loss (3: CLIP-layout ViT; 2: timm ViT, whole images; 1: random crops)
# Constructor arguments of every family's captioning and VQA modules (retrieval's is the run's k_test).
# Captioning skips METEOR, whose JVM start costs ~6 s a run (BLEU, ROUGE-L and CIDEr are still scored).
TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "captioning": {"num_beams": 3, "min_generated_length": 5, "max_generated_length": 24, "meteor": False},
    "vqa": {"answer_list": None, "k_test": 128},
}


@dataclass
class TaskSettings:
    """Fine-tuning budget of one task (the demo's per task, the quality benchmark's per model and task)."""

    epochs: int
    lr: float
    batch_size: int = 48

    def __post_init__(self) -> None:
        if int(self.epochs) != self.epochs or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not float(self.lr) > 0.0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        self.epochs, self.batch_size, self.lr = int(self.epochs), int(self.batch_size), float(self.lr)


# The demo's and the benchmark's retrieval runs are short and small: plain in-batch ITC + ITM, without
# BLIP's momentum encoders, queue and distillation (RetrievalModule's defaults, meant for long COCO runs).
SMALL_RUN_RETRIEVAL: dict[str, Any] = {"momentum": None, "queue_size": 0, "alpha": 0.0}


@dataclass(frozen=True)
class ModelSize:
    """The sizes a small model is built at (every family reads the same fields).

    Args:
        hidden_size: width of every encoder.
        layers: layers per encoder (BLIP: vision, text; XVLM: vision, text, fusion).
        heads: attention heads.
        image_size: side of the square input images.
        patch_size: side of the ViT patches.
    """

    hidden_size: int
    layers: int
    heads: int
    image_size: int
    patch_size: int


def blip_small_config(size: ModelSize) -> dict:
    """SMALL_BACKBONE resized: hidden width, layers, heads (MLP twice as wide), image and patch size."""
    config = copy.deepcopy(SMALL_BACKBONE)
    for part in ("text_config", "vision_config"):
        config[part].update(hidden_size=size.hidden_size, intermediate_size=2 * size.hidden_size,
                            num_hidden_layers=size.layers, num_attention_heads=size.heads)
    config["text_config"]["encoder_hidden_size"] = size.hidden_size
    config["vision_config"].update(image_size=size.image_size, patch_size=size.patch_size)
    config["image_text_hidden_size"] = max(8, size.hidden_size // 2)
    return config


def xvlm_small_config(size: ModelSize) -> dict:
    """A small XVLM: CLIP-layout ViT of `layers` layers (the authors' XVLM_CLIP layout, separate q/k/v),
    `layers` text + `layers` fusion layers, as wide as the ViT; no dropout (as the small BLIP: at this size and
    budget BERT's 0.1 slows ITC learning about twofold)."""
    return dict(hidden_size=size.hidden_size, num_attention_heads=size.heads, intermediate_size=2 * size.hidden_size,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                num_text_layers=size.layers, num_fusion_layers=size.layers, max_position_embeddings=40,
                vision_layout="clip", vision_width=size.hidden_size, vision_layers=size.layers,
                vision_heads=size.heads, vision_intermediate_size=2 * size.hidden_size, patch_size=size.patch_size,
                image_size=size.image_size, embed_dim=max(8, size.hidden_size // 2))


@dataclass(frozen=True)
class BackboneFamily:
    """How the demo and the benchmark build, pretrain, load and fine-tune one backbone family.

    Args:
        name: the registry name ("blip", "xvlm"), also the benchmark's `--models` choice.
        cache_prefix: the cache folder of a pretrained model is `<cache_prefix>-<cache_key>`.
        small_config: the backbone config dict (the family's own format) of a small model.
        pretrain_class: its pretraining LightningModule (`for_pretraining(config, vocab)`); built
            around a backbone, its `pruning_loss` is the pretraining loss that SNIP uses.
        backbone_class: the backbone, read back with `from_pretrained(model_dir)`.
        task_classes: task name -> task LightningModule class.
        finetune_options: task -> constructor arguments its task module gets on top of `TASK_OPTIONS` (a
            task not listed keeps the class's own optimiser defaults).
    """

    name: str
    cache_prefix: str
    small_config: Callable[[ModelSize], dict]
    pretrain_class: type
    backbone_class: type
    task_classes: Mapping[str, type]
    finetune_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def model_dir(self, world_root: str | os.PathLike, cache_dir: str | os.PathLike, config: PretrainConfig) -> Path:
        """Where the model pretrained with `config` on this world is (or will be) cached."""
        return cached_model_dir(world_root, cache_dir, config, prefix=self.cache_prefix)

    def pretrain(self, world_root: str | os.PathLike, cache_dir: str | os.PathLike, config: PretrainConfig,
                 progress: bool = False, num_workers: int = 0) -> Path:
        """Pretrain on the world's caption split, or reuse the cached model; returns its folder."""
        target = self.model_dir(world_root, cache_dir, config)
        return pretrain_cached(world_root, target, config, self.pretrain_class, progress, num_workers)

    def load(self, model_dir: str | os.PathLike) -> tuple[nn.Module, str, dict]:
        """(backbone, vocab path, pretraining record) of a cached pretrained model."""
        record = pretrain_record(model_dir)
        return self.backbone_class.from_pretrained(str(model_dir)), str(Path(model_dir) / "vocab.txt"), record

    def pruning_loss(self, backbone: nn.Module, vocab: str) -> Callable:
        """`loss(model, batch)` for SNIP: the family's pretraining loss, run on `backbone` itself (not a copy)."""
        holder = self.pretrain_class(backbone=backbone, tokenizer=vocab)
        if holder.backbone is not backbone:
            raise RuntimeError(f"{self.name}: the SNIP loss must run the backbone being pruned, not a copy")
        return lambda _model, batch: holder.pruning_loss(batch)

    def task_module(self, task: str, backbone: nn.Module, vocab: str, *, lr: float, k_test: int, **extra: Any):
        """The family's module for `task` around a copy of `backbone`.

        Args:
            lr: fine-tuning learning rate.
            k_test: candidates re-scored per query at retrieval evaluation.
            **extra: further constructor arguments, over `TASK_OPTIONS` and `finetune_options`.
        """
        if task not in self.task_classes:
            raise ValueError(f"family {self.name!r} has no {task!r} task; choose from {list(self.task_classes)}")
        options = {"k_test": k_test, **SMALL_RUN_RETRIEVAL} if task == "retrieval" else TASK_OPTIONS[task]
        options = {**options, **{k: extra.pop(k) for k in list(extra) if k in options}}
        common = dict(backbone=copy.deepcopy(backbone), tokenizer=vocab, lr=lr)
        common.update({k: v for k, v in self.finetune_options.get(task, {}).items() if k not in extra})
        return self.task_classes[task](**options, **common, **extra)


FAMILIES: dict[str, BackboneFamily] = {}


def register_family(family: BackboneFamily) -> BackboneFamily:
    """Add `family` to the registry under its name; a name registered twice is an error naming it."""
    if family.name in FAMILIES:
        raise ValueError(f"backbone family {family.name!r} is already registered ({sorted(FAMILIES)})")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> BackboneFamily:
    """The registered family called `name` (an error lists the registered ones)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown backbone family {name!r}; registered: {sorted(FAMILIES)}") from None


BLIP_SCHEDULE = {"weight_decay": 0.05, "warmup_steps": 10}
BLIP = register_family(BackboneFamily(
    name="blip", cache_prefix=BLIP_CACHE_PREFIX, small_config=blip_small_config, pretrain_class=PretrainModule,
    backbone_class=BlipBackbone,
    task_classes={"retrieval": RetrievalModule, "captioning": CaptioningModule, "vqa": VQAModule},
    # captioning keeps CaptioningModule's defaults (no warmup), as the benchmark's runs were made
    finetune_options={"retrieval": BLIP_SCHEDULE, "vqa": BLIP_SCHEDULE},
))
XVLM = register_family(BackboneFamily(
    name="xvlm", cache_prefix=f"xvlm-pretrained-v{XVLM_CACHE_VERSION}", small_config=xvlm_small_config,
    pretrain_class=XVLMPretrainModule, backbone_class=XVLMBackbone,
    task_classes={"retrieval": XVLMRetrievalModule, "captioning": XVLMCaptioningModule, "vqa": XVLMVQAModule},
    # VQA keeps label smoothing 0.1 (XVLMVQAModule's default is now the authors' 0.0): the committed tables' setting
    finetune_options={"vqa": {"label_smoothing": 0.1}},
))


# ---------------------------------------------------------------------------------------- data
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


def task_datamodule(task: str, world, *, image_size: int, batch_size: int, seed: int, num_workers: int = 0):
    """The world's datamodule for one task, on whole images of `image_size` (the pretrained model's).

    `num_workers` loader processes decode the images (batches do not depend on it: no random transforms).
    """
    common = dict(image_root=world.image_root, tokenizer=world.vocab, image_size=image_size, batch_size=batch_size,
                  eval_batch_size=64, num_workers=num_workers, augment=False, hflip=False, seed=seed)
    if task == "retrieval":
        return full_view(RetrievalDataModule)(train_json=world.retrieval_train, test_json=world.retrieval_test,
                                              max_length=30, **common)
    if task == "captioning":
        return full_view(CaptionDataModule)(train_json=world.caption_train, test_json=world.caption_test,
                                            max_length=30, **common)
    if task == "vqa":
        return full_view(VQADataModule)(train_json=[world.vqa_train, world.vg_train], test_json=world.vqa_test,
                                        answer_list_json=world.answer_list, max_length=20, answer_max_length=6,
                                        vg_answer_weight=None,  # weight 1 per VG answer: the committed tables' setting
                                        **common)
    raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")


def calibration_loader(world, vocab: str, *, image_size: int, batch_size: int, max_length: int = 30, seed: int = 0,
                       num_workers: int = 0):
    """The world's calibration batches (generic captions, no task data) a pretrained backbone is pruned on."""
    return CalibrationDataModule(
        calibration_json=world.calibration, image_root=world.image_root, tokenizer=vocab, image_size=image_size,
        batch_size=batch_size, num_workers=num_workers, max_length=max_length, seed=seed,
    ).calibration_dataloader()


# ---------------------------------------------------------------------------------------- fine-tuning
def finetune_task(family: BackboneFamily, task: str, backbone: nn.Module, vocab: str, world, budget: TaskSettings, *,
                  seed: int, k_test: int, image_size: int, masks, output_dir: str | os.PathLike,
                  root_dir: str | os.PathLike, num_workers: int = 0, accelerator: str = "auto",
                  progress: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """Seed, then fine-tune the family's `task` module around a copy of `backbone` on the world's `task`
    data with `budget` and test it (`fit_and_test`): the one run the demo and the benchmark both make."""
    import lightning as L

    L.seed_everything(seed, workers=True, verbose=False)
    module = family.task_module(task, backbone, vocab, lr=budget.lr, k_test=k_test)
    module.output_dir = str(output_dir)
    data = task_datamodule(task, world, image_size=image_size, batch_size=budget.batch_size, seed=seed,
                           num_workers=num_workers)
    return fit_and_test(module, data, masks=masks, epochs=budget.epochs, root_dir=root_dir, accelerator=accelerator,
                        progress=progress)


def fit_and_test(module, datamodule, *, masks, epochs: int, root_dir: str | os.PathLike, accelerator: str = "auto",
                 progress: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """Fine-tune `module` (kept sparse by `masks` when given), then test it: (test metrics, measured sparsity).

    The sparsity is the callback's measurement of the fine-tuned module per group (empty when dense).
    """
    import lightning as L

    from mflightning.callback import MultiFlowCallback

    pruning = MultiFlowCallback(masks=masks) if masks is not None else None
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=progress, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[pruning] if pruning is not None else [], default_root_dir=str(root_dir),
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, verbose=False)
    sparsity = pruning.measured_sparsity(module) if pruning is not None else {}
    return dict(module.eval_results["test"]), sparsity
