"""The task modules' optimiser: AdamW with optional no-decay groups and a warmup + cosine/linear schedule.

BLIP fine-tunes with cosine decay (warmup in steps, down to ``min_lr``); XVLM with linear decay
after a warmup of 10% of the steps and no weight decay on biases/LayerNorms. Both are settings
of the one ``configure_adamw`` below, chosen by the task module's constructor arguments.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn

Schedule = Literal["cosine", "linear"]
SCHEDULES = ("cosine", "linear")


def cosine_lambda(total_steps: int, warmup_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warmup, then cosine from 1 to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def linear_warmup_lambda(total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warmup to 1, then linear decay to ``min_lr_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return min_lr_ratio + (1.0 - min_lr_ratio) * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def check_schedule(schedule: str, warmup_steps: int, warmup_ratio: float) -> None:
    """Raise naming the setting when the schedule, warmup steps or warmup ratio cannot be used."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if warmup_steps and warmup_ratio:
        raise ValueError(f"give warmup_steps ({warmup_steps}) or warmup_ratio ({warmup_ratio}), not both: "
                         "set the other to 0")


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 no_decay_bias_norm: bool) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: decayed ones, and (``no_decay_bias_norm``) biases,
    LayerNorms and scalars such as the ITC temperature without weight decay."""
    decay, no_decay = [], []
    for name, param in named:
        if not param.requires_grad:
            continue
        if no_decay_bias_norm and (param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name):
            no_decay.append(param)
        else:
            decay.append(param)
    groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def configure_adamw(named: Iterable[tuple[str, nn.Parameter]], total_steps: float, *, lr: float,
                    weight_decay: float, betas: tuple[float, float], no_decay_bias_norm: bool, schedule: str,
                    warmup_steps: int, warmup_ratio: float, min_lr: float) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: AdamW and a per-step warmup + ``schedule`` decay.

    The warmup is ``warmup_steps`` optimizer steps, or ``warmup_ratio`` of ``total_steps``.
    """
    if not math.isfinite(total_steps):
        raise ValueError(f"the {schedule} schedule needs a finite number of steps: set max_epochs or max_steps")
    optimizer = torch.optim.AdamW(param_groups(named, weight_decay, no_decay_bias_norm), lr=lr, betas=betas)
    total = int(total_steps)
    warmup = warmup_steps + int(warmup_ratio * total_steps)
    ratio = min_lr / lr if lr > 0 else 0.0
    factor = cosine_lambda(total, warmup, ratio) if schedule == "cosine" else linear_warmup_lambda(total, warmup, ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


__all__ = ["SCHEDULES", "Schedule", "check_schedule", "configure_adamw", "cosine_lambda", "linear_warmup_lambda",
           "param_groups"]
