"""One scoring function per method: higher score = more important = kept.

Each takes one weight matrix (out x in) and what its method needs, and returns an fp32 tensor of
the weight's shape. Each is registered as a method (`methods.py`) with what it needs and its own
allocation rule; the layer-wise allocation of the pruned entries lives in `allocation.py`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .methods import register_method


@register_method("omp", needs=None, allocation="global", description="one-shot global magnitude pruning")
def magnitude_scores(weight: Tensor) -> Tensor:
    """|W| (OMP)."""
    return weight.detach().abs().float()


@register_method("multiflow", needs="activations", allocation="modality",
                 description="information flow (Eq. 6) with the multimodal prior (Eq. 7-8)")
def multiflow_scores(weight: Tensor, input_norm: Tensor) -> Tensor:
    """Information flow (Eq. 4-6): S_out[r] * |W[r, l]| * S_in[l].

    With a = input_norm (the L2 norm of each input feature over the calibration tokens):
    S_in[l] = mean_r |W[r, l]| a[l] and S_out[r] = mean_l |W[r, l]| a[l].
    """
    magnitude = weight.detach().abs().float()
    weighted = magnitude * input_norm.to(device=magnitude.device, dtype=torch.float32).unsqueeze(0)
    s_in = weighted.mean(dim=0)
    s_out = weighted.mean(dim=1)
    del weighted
    return magnitude.mul_(s_out.unsqueeze(1)).mul_(s_in.unsqueeze(0))


@register_method("wanda", needs="activations", allocation="row",
                 description="|W| * input norm, compared within each output row")
def wanda_scores(weight: Tensor, input_norm: Tensor) -> Tensor:
    """|W[r, l]| * a[l] (Wanda; compared within each output row)."""
    return weight.detach().abs().float() * input_norm.to(device=weight.device, dtype=torch.float32).unsqueeze(0)


@register_method("lamp", needs=None, allocation="global", description="layer-adaptive magnitude scores, global threshold")
def lamp_scores(weight: Tensor) -> Tensor:
    """LAMP: w_i^2 / sum_{j >= i} w_j^2 over the layer's weights sorted by w^2 ascending."""
    squared = weight.detach().float().reshape(-1).square()
    ordered, order = torch.sort(squared)
    suffix = ordered.flip(0).cumsum(0).flip(0)
    normalised = ordered / suffix.clamp_min(torch.finfo(torch.float32).tiny)
    scores = torch.empty_like(squared)
    scores[order] = normalised
    return scores.view_as(weight)


@register_method("snip", needs="gradients", allocation="global", description="|gradient * weight| of the pretraining loss")
@register_method("itersnip", needs="gradients", allocation="global", iterative=True,
                 description="SNIP repeated over rounds with an exponential schedule")
def snip_scores(weight: Tensor, gradient: Tensor) -> Tensor:
    """|g * w| with g the loss gradient summed over the calibration batches (SNIP)."""
    return (gradient.to(weight.device, torch.float32) * weight.detach().float()).abs()


@register_method("random", needs="generator", allocation="global", description="random scores, global threshold")
def random_scores(weight: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform random scores from a seeded CPU generator (identical on every process)."""
    return torch.rand(weight.shape, generator=generator, dtype=torch.float32).to(weight.device)
