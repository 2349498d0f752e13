"""XVLM retrieval on 2 CPU processes (plain torch.distributed, gloo), compared with the XVLM authors' code.

Run as a script: python gather_backward_script.py WORKDIR. Each rank saves, for the module's ITC with
``gather_backward`` "sum" and "local", the encoders' ITC gradients averaged over ranks (as DDP does), and
the same gradients from the authors' definition written out here: their ``AllGather`` (backward = the
local slice of the gradient, nothing summed) and their ``get_contrastive_loss`` (every rank computes the
loss of the whole global batch). It also saves the module's ITM loss with ``itm_negatives`` "local" and
"global", and one process's ITM on this rank's rows alone. Hard negatives are the last valid candidate
(deterministic), dropout is off.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mflightning.losses as losses  # noqa: E402
from task_fixtures import XVLM_TINY_BACKBONE, make_images, make_tokenizer, tokenize  # noqa: E402
from mflightning.tasks import XVLMRetrievalModule  # noqa: E402


CANDIDATES: list[int] = []  # how many candidates each hard-negative draw chose from


def last_negatives(sim, same_image, generator=None):
    """Deterministic negatives: the last candidate of another image (with global candidates, rank 0's
    rows then take theirs from rank 1)."""
    CANDIDATES.append(sim.size(1))
    valid = ~same_image
    rows = torch.nonzero(valid.any(1)).flatten()
    columns = torch.arange(valid.size(1)).expand_as(valid).masked_fill(~valid, -1)
    return rows, columns[rows].max(1).values


losses.sample_hard_negatives = last_negatives


class AuthorsAllGather(torch.autograd.Function):
    """The XVLM authors' AllGather (models/xvlm/xvlm.py): the backward returns the local slice only."""

    @staticmethod
    def forward(ctx, tensor, rank, world_size):
        output = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(output, tensor)
        ctx.rank, ctx.batch_size = rank, tensor.shape[0]
        return torch.cat(output, 0)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output[ctx.batch_size * ctx.rank: ctx.batch_size * (ctx.rank + 1)], None, None


def authors_itc(module, batch):
    """The authors' get_contrastive_loss with idx: the whole global batch's loss, on every rank."""
    bb, rank, world = module.backbone, dist.get_rank(), dist.get_world_size()
    image_feat = bb.image_features(bb.encode_image(batch["image"]))
    text_feat = bb.text_features(bb.encode_text(batch["input_ids"], batch["attention_mask"]))
    image_all = AuthorsAllGather.apply(image_feat, rank, world)
    text_all = AuthorsAllGather.apply(text_feat, rank, world)
    logits = image_all.float() @ text_all.float().t() / bb.temp
    idx_all = AuthorsAllGather.apply(batch["image_idx"].view(-1, 1), rank, world)
    pos = torch.eq(idx_all, idx_all.t()).float()
    labels = pos / pos.sum(1, keepdim=True)
    loss_i2t = -torch.sum(F.log_softmax(logits, dim=1) * labels, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(logits.t(), dim=1) * labels, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def averaged_grads(module):
    """Every parameter's gradient averaged over ranks (what DDP hands the optimizer), then cleared."""
    out = {}
    for name, p in module.named_parameters():
        if p.grad is not None:
            g = p.grad.detach().clone()
            dist.all_reduce(g)
            out[name] = g / dist.get_world_size()
    module.zero_grad(set_to_none=True)
    return out


def main(rank: int, workdir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=2)
    os.makedirs(os.path.join(workdir, f"vocab{rank}"), exist_ok=True)
    tokenizer = make_tokenizer(os.path.join(workdir, f"vocab{rank}"))
    images, labels = make_images(4, seed=3)
    captions = [f"a {c} {s}" for c, s in labels] + [f"the {s} is {c}" for c, s in labels]
    ids, att = tokenize(tokenizer, captions)
    full = {"image": torch.cat([images, images]), "input_ids": ids, "attention_mask": att,
            "image_idx": torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])}
    mine = {k: v[rank * 4:(rank + 1) * 4] for k, v in full.items()}  # each image has a positive on the other rank
    torch.manual_seed(0)
    module = XVLMRetrievalModule(backbone=XVLM_TINY_BACKBONE, tokenizer=tokenizer).eval()  # eval: no dropout
    out = {}
    for mode in ("sum", "local"):
        module.gather_backward = mode
        itc, _ = module.retrieval_losses(mine)
        itc.backward()
        out[f"ours_{mode}"] = averaged_grads(module)
    authors_itc(module, mine).backward()
    out["authors"] = averaged_grads(module)
    with torch.no_grad():
        for negatives in ("local", "global"):
            module.itm_negatives = negatives
            CANDIDATES.clear()
            out[f"itm_{negatives}"] = float(module.retrieval_losses(mine)[1])
            out[f"candidates_{negatives}"] = list(CANDIDATES)
    dist.barrier()
    dist.destroy_process_group()
    with torch.no_grad():  # one process, this rank's rows alone
        out["itm_alone"] = float(module.retrieval_losses(mine)[1])
    torch.save(out, os.path.join(workdir, f"rank{rank}.pt"))


if __name__ == "__main__":  # forked: the slow imports above run once
    torch.multiprocessing.start_processes(main, args=(sys.argv[1],), nprocs=2, start_method="fork")
