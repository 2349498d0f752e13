"""ImageClassificationModule on tiny random ViTs with MultiFlowCallback: calibrates on the datamodule's ImageNet-style
folder, trains with the masks exact, resumes from a checkpoint without recalibrating; the four backbone kinds."""
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mflightning import MultiFlowCallback, prune
from mflightning.data import ImageClassificationDataModule, ImageFolderCalibration
from mflightning.tasks import ImageClassificationModule
from mflightning.testing import write_image_folder

SIZE = 16
BACKBONES = {
    "vit": dict(family="vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=SIZE, patch_size=8),
    "dinov2": dict(family="dinov2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                   image_size=SIZE, patch_size=8),
    "timm": dict(family="timm", img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=4),
    "torchvision": dict(family="torchvision", image_size=SIZE, patch_size=8, num_layers=2, num_heads=4,
                        hidden_dim=32, mlp_dim=64),
}


class Counting(ImageClassificationModule):
    calibration_calls = 0

    def calibration_step(self, batch):
        self.calibration_calls += 1
        return super().calibration_step(batch)


def datamodule(root):
    write_image_folder(root, splits=("train", "test"), classes=("a", "b", "c"), per_class=4)
    write_image_folder(root / "imagenet", splits=("train",), classes=("n1", "n2"), per_class=3)
    calibration = ImageFolderCalibration(image_root=str(root / "imagenet" / "train"), image_size=SIZE, batch_size=2)
    return ImageClassificationDataModule(str(root), image_size=SIZE, resize_size=SIZE, batch_size=4, num_workers=0,
                                         calibration=calibration)


def trainer(root, **kwargs):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(root), **kwargs)


def assert_masks_hold(callback, module):
    params = dict(module.named_parameters())
    pruned = kept = 0
    for name, mask in callback.kept_masks.items():
        assert (params[name].detach()[~mask] == 0).all(), name
        pruned += int((~mask).sum())
        kept += int(mask.sum())
    return pruned / (pruned + kept)


def test_prune_once_fine_tune_resume(tmp_path):
    dm = datamodule(tmp_path)
    torch.manual_seed(0)
    module = Counting(BACKBONES["vit"], num_classes=3, lr=1e-3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callback = MultiFlowCallback(0.6)  # calibration: the datamodule's calibration_dataloader()
    trainer(tmp_path, max_epochs=1, callbacks=[callback, checkpoint]).fit(module, datamodule=dm)
    assert module.calibration_calls == 3  # 6 calibration images in batches of 2
    # the backbone's 12 Linears masked in the one image group; the fresh head dense
    assert len(callback.kept_masks) == 12 and all(n.startswith("backbone.layers.") for n in callback.kept_masks)
    assert set(callback.result.dense_layers) == {"head.weight"} and set(callback.result.groups.values()) == {"vision"}
    sparsity = assert_masks_hold(callback, module)
    assert sparsity == pytest.approx(callback.result.sparsity) and abs(sparsity - 0.6) < 0.01
    assert bool((module.head.weight != 0).all())
    # validation accuracy is the top-1 of the module's own logits on the test split (eval split here)
    metrics = trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0]
    with torch.no_grad():
        batches = list(dm.val_dataloader())
        hits = sum(int((module(b["image"]).argmax(1) == b["label"]).sum()) for b in batches)
    assert metrics["val/top1"] == pytest.approx(hits / 12) and "val/top5" not in metrics  # 3 classes: no top-5

    resumed = Counting(BACKBONES["vit"], num_classes=3, lr=1e-3)
    second = MultiFlowCallback(0.6)
    trainer(tmp_path, max_epochs=2, callbacks=[second]).fit(resumed, datamodule=dm,
                                                           ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.calibration_calls == 0
    assert all(torch.equal(second.kept_masks[n], m) for n, m in callback.kept_masks.items())
    assert assert_masks_hold(second, resumed) == pytest.approx(sparsity)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_every_backbone_kind_classifies_and_calibrates(kind):
    torch.manual_seed(0)
    module = ImageClassificationModule(BACKBONES[kind], num_classes=7).eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    assert module(images).shape == (2, 7) and module.pruning_preset in ("vit", "timm_vit", "torchvision_vit")
    result = prune(module, sparsity=0.5, calibration=[{"image": images, "label": torch.tensor([0, 6])}],
                   forward=lambda m, b: m.calibration_step(b))
    assert "head.weight" in result.dense_layers
    assert all(n.startswith("backbone.") for n in result.masks)
    with pytest.raises(KeyError, match="needs labels"):  # SNIP on unlabeled calibration images
        module.pruning_loss({"image": images})
    # the SNIP loss reaches the backbone through the head
    module.pruning_loss({"image": images, "label": torch.tensor([0, 6])}).backward()
    assert all(module.get_parameter(n).grad is not None for n in result.masks)
    # every trainable parameter gets a gradient (plain DDP needs it): the encoder's own head is frozen
    module.zero_grad()
    module.training_step({"image": images, "label": torch.tensor([1, 2])}, 0).backward()
    assert [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None] == []


def test_the_authors_optimiser_and_schedule():
    module = ImageClassificationModule(BACKBONES["vit"], num_classes=3)
    assert (module.lr, module.weight_decay, module.warmup_ratio, module.schedule) == (1e-5, 0.0, 0.1, "cosine")
    module.trainer = SimpleNamespace(estimated_stepping_batches=30)  # e.g. 3 batches x 10 epochs
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert configured["lr_scheduler"]["interval"] == "step"
    # AdamW without weight decay is Adam, the authors' optimiser
    assert type(optimizer).__name__ == "AdamW" and [g["weight_decay"] for g in optimizer.param_groups] == [0.0]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    seen = []
    for _ in range(30):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # 3 warmup steps (10%), then cosine from 1e-5 towards 0 over the other 27
    assert seen[:3] == pytest.approx([1e-5 / 3, 2e-5 / 3, 1e-5])
    assert seen[3 + 13] == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 13 / 27)))
    assert seen[-1] < 1e-7


def test_a_vision_language_backbone_trains_its_image_encoder_under_its_own_preset():
    from mflightning.models import BlipBackbone, tiny_config

    torch.manual_seed(0)
    module = ImageClassificationModule(BlipBackbone(tiny_config(vocab_size=50, image_size=SIZE, patch_size=8)),
                                       num_classes=4)
    trainable = [n for n, p in module.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("vision_model.") for n in trainable)  # text side and projections frozen
    assert module(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 4)
    # masks of the bare backbone (vision and text groups) cover the module: its head is dense under "blip+head"
    assert module.pruning_preset == "blip+head"
    calibration = [{"image": torch.randn(2, 3, SIZE, SIZE), "input_ids": torch.randint(5, 50, (2, 6)),
                    "attention_mask": torch.ones(2, 6, dtype=torch.long)}]
    masks = prune(module.backbone, sparsity=0.5, calibration=calibration)
    resolved = masks.masks_for(module)
    assert set(resolved) == {f"backbone.{n}" for n in masks.masks}
