"""A tiny two-modality model and Lightning module shared by the core tests and the DDP script."""
from __future__ import annotations

import lightning as L
import torch
from torch import nn

GROUPS = {"vision": r"^(model\.)?vision\.", "text": r"^(model\.)?text\."}


class ToyVLM(nn.Module):
    """Vision MLP on patch tokens, text MLP on word tokens with a cross-attention-like fusion, and a head."""

    def __init__(self, dim: int = 16, vocab: int = 20):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.vision = nn.Sequential(nn.Linear(12, dim), nn.GELU(), nn.Linear(dim, dim))
        self.text = nn.ModuleDict(
            {"fc1": nn.Linear(dim, 2 * dim), "fc2": nn.Linear(2 * dim, dim), "fuse": nn.Linear(dim, dim)}
        )
        self.head = nn.Linear(dim, 2)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        v = self.vision(image)  # (B, P, dim)
        t = self.embed(input_ids)
        t = self.text["fc2"](torch.relu(self.text["fc1"](t)))
        t = t + self.text["fuse"](v.mean(1, keepdim=True))
        pooled = (t * attention_mask.unsqueeze(-1)).sum(1) / attention_mask.sum(1, keepdim=True)
        return self.head(pooled)


def make_batches(n: int, batch_size: int = 4, length: int = 6, seed: int = 0) -> list[dict]:
    """Random image patches, token ids and right-padded attention masks."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        lengths = torch.randint(2, length + 1, (batch_size,), generator=g)
        mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
        batches.append(
            {
                "image": torch.randn(batch_size, 5, 12, generator=g),
                "input_ids": torch.randint(1, 20, (batch_size, length), generator=g) * mask,
                "attention_mask": mask,
                "label": torch.randint(0, 2, (batch_size,), generator=g),
            }
        )
    return batches


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("image", "input_ids", "attention_mask")}


class ToyModule(L.LightningModule):
    """Classification on the toy VLM, with `calibration_step` and a configurable optimizer."""

    def __init__(self, lr: float = 0.05, weight_decay: float = 0.1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.model = ToyVLM()
        self.lr = lr
        self.weight_decay = weight_decay
        self.calibration_calls = 0

    def calibration_step(self, batch: dict) -> None:
        self.calibration_calls += 1
        self.model(**model_inputs(batch))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(**model_inputs(batch))
        return nn.functional.cross_entropy(logits.float(), batch["label"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    """A one-device CPU Trainer without logger, checkpoints, progress bar or summary (kwargs override)."""
    options = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return L.Trainer(**options)
