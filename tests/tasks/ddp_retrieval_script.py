"""BLIP retrieval training steps on 1 or 2 CPU processes (DDP, gloo); each rank saves its loss, its
(DDP-averaged) gradients and its queue.

Run as a script (DDP re-executes this command per rank): python ddp_retrieval_script.py DEVICES WORKDIR

The global batch is 8 captions of 4 images (image_idx 0 1 2 3 0 1 2 3): one process trains on all 8,
two processes on rows 0-3 and 4-7, so every image has a positive on the other process. Hard
negatives are the most similar valid candidate (argmax instead of multinomial sampling) and dropout
is off, so one and two processes can be compared number for number. Runs, each a fresh module:
- "equal": gather=True, no momentum, no queue, no distillation (1 and 2 processes);
- "local": the same with gather=False (2 processes): each process sees only its own batch;
- "queue": momentum 0.995, queue of 16, alpha 0.4, two steps (2 processes): the local momentum
  features of each step are saved, to compare with the queue.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import mflightning.losses as losses  # noqa: E402
from task_fixtures import TINY_BACKBONE, make_images, make_tokenizer, tokenize  # noqa: E402
from mflightning.tasks import RetrievalModule  # noqa: E402


def argmax_negatives(sim, same_image, generator=None):
    """`sample_hard_negatives` made deterministic: the most similar candidate of another image."""
    scores = sim.detach().float().masked_fill(same_image, float("-inf"))
    rows = torch.nonzero(torch.isfinite(scores).any(1)).flatten()
    return rows, scores[rows].argmax(1)


losses.sample_hard_negatives = argmax_negatives

CONFIG = {**TINY_BACKBONE,
          "text_config": {**TINY_BACKBONE["text_config"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
          "vision_config": {**TINY_BACKBONE["vision_config"], "attention_dropout": 0.0}}


def full_batch(tokenizer) -> dict:
    images, labels = make_images(4, seed=3)
    captions = [f"a {c} {s}" for c, s in labels] + [f"the {s} is {c}" for c, s in labels]
    ids, att = tokenize(tokenizer, captions)
    return {"image": torch.cat([images, images]), "input_ids": ids, "attention_mask": att,
            "image_idx": torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])}


class Probe(RetrievalModule):
    """Trains on this rank's share of the global batch and records what the test compares."""

    def __init__(self, batch: dict, steps: int, trim: bool = False, **kwargs):
        super().__init__(backbone=CONFIG, **kwargs)
        self.batch, self.steps, self.trim = batch, steps, trim
        self.record: dict = {"loss": [], "grads": None, "momentum_image_feat": [], "momentum_text_feat": []}
        for module in self.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if self.backbone_m is not None:
            image_features, text_features = self.backbone_m.image_features, self.backbone_m.text_features

            def recorded(fn, key):
                def call(*args):
                    out = fn(*args)
                    self.record[key].append(out.detach().clone())
                    return out
                return call

            self.backbone_m.image_features = recorded(image_features, "momentum_image_feat")
            self.backbone_m.text_features = recorded(text_features, "momentum_text_feat")

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        share = 8 // world
        part = {k: v[rank * share:(rank + 1) * share] for k, v in self.batch.items()}
        if self.trim:  # padded to this rank's longest caption, as a collate with padding='longest' does
            length = int(part["attention_mask"].sum(1).max())
            part["input_ids"], part["attention_mask"] = part["input_ids"][:, :length], part["attention_mask"][:, :length]
        return torch.utils.data.DataLoader([part] * self.steps, batch_size=None)  # each item a whole batch

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.record["loss"].append(float(loss.detach()))
        return loss

    def on_before_optimizer_step(self, optimizer):
        if self.record["grads"] is None:  # the first step's gradients, averaged over processes by DDP
            self.record["grads"] = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}


def main(devices: int, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    tokenizer = make_tokenizer(workdir)
    batch = full_batch(tokenizer)
    runs = {"equal": dict(momentum=None, queue_size=0, alpha=0.0, gather=True, steps=1)}
    if devices > 1:
        runs["local"] = dict(momentum=None, queue_size=0, alpha=0.0, gather=False, steps=1)
        runs["queue"] = dict(momentum=0.995, queue_size=16, alpha=0.4, gather=True, steps=2)
        runs["equal-longest"] = dict(momentum=None, queue_size=0, alpha=0.0, gather=True, steps=1, trim=True)
        runs["queue-local"] = dict(momentum=0.995, queue_size=16, alpha=0.4, gather=False, steps=2)
    for name, settings in runs.items():
        pl.seed_everything(0)
        steps = settings.pop("steps")
        module = Probe(batch, steps, tokenizer=tokenizer, lr=1e-3, **settings)
        trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                             max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             use_distributed_sampler=False, default_root_dir=workdir)
        trainer.fit(module)
        out = dict(module.record)
        if module.queue is not None:
            out["queue"] = {k: v.clone() for k, v in module.queue.state_dict().items()}
        torch.save(out, os.path.join(workdir, f"{name}-{devices}-rank{trainer.global_rank}.pt"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
