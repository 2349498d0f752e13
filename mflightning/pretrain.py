"""Pretrain a small backbone on the synthetic world's caption split, cached on disk.

The demo needs a pretrained model to prune, and no checkpoint can be downloaded: this module
trains one from scratch on the world's generic (calibration) image-caption split. A small BLIP
(`pretrain`, `PretrainModule`) learns with BLIP's three pretraining losses (ITC + ITM + LM) in
BLIP's pretraining layout (decoder cross-attention and FFN shared with the encoder); a small XVLM
(`XVLMPretrainModule`) with ITC + ITM + MLM. `pretrain_cached` does the training and the caching
for both: the result is written with the backbone's `save_pretrained` into a folder named by a
hash of the world manifest and the configuration (`cache_key`), so a second run loads it instead.
`mflightning.families` names each family's folder prefix and pretraining module.

Run it alone with `python -m mflightning.pretrain --world outputs/cache/world`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchvision import transforms as T

from mflightning.data.datasets import ImageTextCollate, ImageTextDataset
from mflightning.data.tokenizer import build_tokenizer
from mflightning.data.transforms import build_test_transform

from mflightning.models import BlipBackbone
from mflightning.tasks import BlipTaskModule, XVLMTaskModule

CACHE_VERSION = 2  # 2: whole images (no random crops)
DONE_FILE = "pretrain.json"
BLIP_CACHE_PREFIX = "pretrained"  # the small BLIP's cache folder: pretrained-<cache_key>

# A small BLIP: 2-layer ViT on 64 px images with 8 px patches (64 tokens), 2-layer text transformer.
SMALL_BACKBONE: dict[str, Any] = {
    "text_config": {
        "hidden_size": 128, "encoder_hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 40,
    },
    "vision_config": {
        "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 64, "patch_size": 8, "initializer_range": 0.02,
    },
    "image_text_hidden_size": 64,
}


class PretrainModule(BlipTaskModule):
    """BLIP pretraining on image-caption batches: ITC + ITM (hard negatives) + LM (label smoothing 0.1).

    Holds ``self.backbone`` (decoder cross-attention/FFN tied to the encoder when ``tie_decoder``,
    as in BLIP pretraining), so it also serves as the model of a pruning recipe: its
    ``calibration_step`` runs every prunable layer and ``pruning_loss`` is the same ITC+ITM+LM
    loss (used by SNIP / IterSNIP). Arguments as ``BlipTaskModule`` plus ``tie_decoder``.
    """

    def __init__(self, *args: Any, tie_decoder: bool = True, **kwargs: Any):
        kwargs.setdefault("lr", 3e-4)
        kwargs.setdefault("weight_decay", 0.05)
        super().__init__(*args, **kwargs)
        self.tie_decoder = tie_decoder
        if tie_decoder:
            self.backbone.tie_decoder_()

    def losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The three pretraining losses of one image-caption batch (the base's ITC + ITM + LM)."""
        return self.pretraining_losses(batch)

    @classmethod
    def for_pretraining(cls, config: "PretrainConfig", tokenizer: str) -> "PretrainModule":
        """A fresh module with the backbone and optimiser settings of `config` (what `pretrain` trains)."""
        return cls(backbone=copy.deepcopy(config.backbone), tokenizer=tokenizer, lr=config.lr,
                   weight_decay=config.weight_decay, warmup_steps=config.warmup_steps)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        parts = self.losses(batch)
        loss = parts["itc"] + parts["itm"] + parts["lm"]
        self.log_dict({f"train/loss_{k}": v for k, v in parts.items()}, batch_size=batch["image"].size(0))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].size(0))
        return loss


class XVLMPretrainModule(XVLMTaskModule):
    """XVLM pretraining on image-caption batches: the sum of every ``pretraining_losses`` term (ITC + ITM +
    MLM + caption LM, + the decoder's LM if any) is the training loss.

    Arguments as ``XVLMTaskModule``; it also serves as the holder of the SNIP loss of an XVLM backbone
    (``pruning_loss``: ITC + ITM + MLM only, as the MULTIFLOW code).
    """

    @classmethod
    def for_pretraining(cls, config: "PretrainConfig", tokenizer: str) -> "XVLMPretrainModule":
        """A fresh module with the backbone and optimiser settings of `config` (its schedule is XVLM's own)."""
        return cls(backbone=copy.deepcopy(config.backbone), tokenizer=tokenizer, lr=config.lr,
                   weight_decay=config.weight_decay)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = sum(self.pretraining_losses(batch).values())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].size(0))
        return loss


@dataclass
class PretrainConfig:
    """What the pretrained model depends on (all of it goes into the cache key)."""

    backbone: dict = field(default_factory=lambda: copy.deepcopy(SMALL_BACKBONE))
    epochs: int = 10
    batch_size: int = 48
    lr: float = 8e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    max_length: int = 30
    augment: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"PretrainConfig.lr must be positive, got {self.lr}")

    @property
    def image_size(self) -> int:
        """Side of the pretraining images: `vision_config.image_size` of a BLIP config, `image_size` of an XVLM one."""
        vision = self.backbone.get("vision_config")
        return int(vision["image_size"] if vision is not None else self.backbone["image_size"])


def cache_key(manifest: Mapping[str, Any], config: PretrainConfig) -> str:
    """Hash of the world manifest, the pretraining config and the cache format."""
    material = {"cache_version": CACHE_VERSION, "world": dict(manifest), "config": asdict(config)}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(world_root: str | os.PathLike) -> dict:
    """The world's world.json (what makes two worlds the same), with a clear error when missing."""
    path = Path(world_root) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: generate the world first (mflightning.data.generate_world)")
    return json.loads(path.read_text())


def cached_model_dir(world_root: str | os.PathLike, cache_dir: str | os.PathLike, config: PretrainConfig,
                     prefix: str = BLIP_CACHE_PREFIX) -> Path:
    """Where the model pretrained with `config` on this world is (or will be) stored: `<prefix>-<cache_key>`."""
    return Path(cache_dir) / f"{prefix}-{cache_key(read_manifest(world_root), config)}"


def pretrain(
    world_root: str | os.PathLike,
    cache_dir: str | os.PathLike,
    config: PretrainConfig | None = None,
    progress: bool = True,
    num_workers: int = 0,
    force: bool = False,
) -> Path:
    """Pretrain the small BLIP on the world's calibration split (or reuse the cached model); returns the folder.

    The folder holds the backbone (``config.json``, ``model.safetensors``), the tokenizer's
    ``vocab.txt`` and ``pretrain.json`` (cache key material, loss history, seconds taken).
    """
    config = config or PretrainConfig()
    target = cached_model_dir(world_root, cache_dir, config)
    return pretrain_cached(world_root, target, config, PretrainModule, progress, num_workers, force)


def pretrain_cached(
    world_root: str | os.PathLike,
    target: Path,
    config: PretrainConfig,
    module_class: type,
    progress: bool = True,
    num_workers: int = 0,
    force: bool = False,
) -> Path:
    """Train `module_class.for_pretraining(config, vocab)` on the world's caption split into `target`.

    Reuses `target` when it holds a finished model (its `pretrain.json`) unless `force`. The model
    is written to `<target>.partial` first and renamed, so an interrupted run leaves no model behind.
    """
    world_root = Path(world_root)
    manifest = read_manifest(world_root)
    if (target / DONE_FILE).is_file() and not force:
        return target
    vocab = world_root / "vocab.txt"
    started = time.perf_counter()
    L.seed_everything(config.seed, workers=True, verbose=False)
    loader = caption_loader(world_root / "calibration.json", world_root / "images", str(vocab), config, num_workers)
    module = module_class.for_pretraining(config, str(vocab))
    history = LossHistory()
    trainer = L.Trainer(
        accelerator="auto", devices=1, max_epochs=config.epochs, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=progress, callbacks=[history], log_every_n_steps=10,
        default_root_dir=str(target.parent / "lightning"),
    )
    with one_thread():
        trainer.fit(module, train_dataloaders=loader)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    module.backbone.save_pretrained(partial)
    shutil.copyfile(vocab, partial / "vocab.txt")
    record = {
        "cache_version": CACHE_VERSION, "world": manifest, "config": asdict(config),
        "seconds": round(time.perf_counter() - started, 1), "epoch_losses": history.epoch_losses,
    }
    (partial / DONE_FILE).write_text(json.dumps(record, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread inside the block (the count before is restored after).

    Pretraining on two threads was not bit-reproducible on CPU (two runs of 3 epochs already differed by 2e-5,
    90 epochs by 0.05, and the demo's table with them), one thread is: the reduction order is fixed. At the
    small model's widths the second thread hardly helps anyway, and under load it slows training many times.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def caption_loader(
    records: str | os.PathLike, image_root: str | os.PathLike, tokenizer: str, config: PretrainConfig, num_workers: int = 0
) -> DataLoader:
    """Shuffled image-caption batches of whole images (resized, never cropped: captions name every object and
    where it is), with RandAugment when `config.augment`; the last partial batch is dropped."""
    transform = build_test_transform(config.image_size)
    if config.augment:
        transform = T.Compose([T.RandAugment(num_ops=2, magnitude=7), transform])
    dataset = ImageTextDataset(os.fspath(records), os.fspath(image_root), transform, skip_bad_records=False)
    if len(dataset) < config.batch_size:
        raise ValueError(f"{records}: {len(dataset)} records are fewer than batch_size={config.batch_size}")
    collate = ImageTextCollate(build_tokenizer(tokenizer), config.max_length)
    generator = torch.Generator().manual_seed(config.seed)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                      num_workers=num_workers, generator=generator, persistent_workers=num_workers > 0)


class LossHistory(L.Callback):
    """Mean training loss of every epoch (kept in pretrain.json to show pretraining converged)."""

    def __init__(self) -> None:
        self.epoch_losses: list[float] = []
        self._sum = 0.0
        self._count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        self._sum += float(loss)
        self._count += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._count:
            self.epoch_losses.append(round(self._sum / self._count, 4))
        self._sum, self._count = 0.0, 0


def pretrain_record(model_dir: str | os.PathLike) -> dict:
    """The `pretrain.json` of a finished pretrained model folder (an error names a folder without one)."""
    path = Path(model_dir) / DONE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{Path(model_dir)} holds no finished pretrained model ({DONE_FILE} missing)")
    return json.loads(path.read_text())


def load_pretrained(model_dir: str | os.PathLike) -> tuple[BlipBackbone, str]:
    """The cached small BLIP and the path of its vocab.txt."""
    pretrain_record(model_dir)
    return BlipBackbone.from_pretrained(str(model_dir)), str(Path(model_dir) / "vocab.txt")


def main(argv: list[str] | None = None) -> None:
    """`python -m mflightning.pretrain --world DIR [--cache-dir DIR] [--epochs N]`: print the model folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", required=True, help="root of a world written by generate_world")
    parser.add_argument("--cache-dir", default="outputs/cache")
    parser.add_argument("--epochs", type=int, default=PretrainConfig.epochs)
    parser.add_argument("--force", action="store_true", help="retrain even when a cached model exists")
    args = parser.parse_args(argv)
    print(pretrain(args.world, args.cache_dir, PretrainConfig(epochs=args.epochs), force=args.force))


if __name__ == "__main__":
    main()
