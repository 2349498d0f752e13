"""CHITA and CHITA++ (Benbaki et al., "Fast as CHITA", ICML 2023) as the MultiFlow authors ran them.

The loss near the current weights w_bar is modelled from n calibration gradients, the rows of
A (n x p, one loss gradient per calibration batch, over all p prunable weights):

    min_w  1/2 ||A w_bar - A w||^2 + lambda2 ||w - w_bar||^2 + alpha^T w   s.t. ||w||_0 <= k

with alpha = A.sum(0) / batch size (the first-order term), lambda2 = n * lambda / 2 (lambda = 1e-5)
and k the weights kept. The solve (the authors' `Heuristic_LSBlock`, split type 1): one iterative
hard thresholding step with line search on the whole problem sets a global magnitude threshold;
then each block of at most 10^4 consecutive weights of a layer keeps its entries above it, takes
one more thresholding step of its own and backsolves the kept weights in closed form (Woodbury
when n < k). CHITA++ repeats gradients and solve over `rounds` rounds at sparsities
1 - (1 - s)^((t+1)/T), each round on the pruned, updated model; a pruned weight gets no gradient
after its round, so it stays pruned. Everything here is torch; the engine runs the rounds.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Callable

import torch
from torch import Tensor, nn

from .batches import Batch, ReduceFn
from .methods import register_method
from .stats import collect_gradients
from .targets import Target

BLOCK_SIZE = 10_000  # weights per block (the authors' block_size = 1e4)
LAMBDA = 1e-5  # ridge penalty (the authors' default lambda_)
LINE_SEARCH_STEPS = 10  # the authors' sea_max_itr
# p-long fp32 vectors' worth the solve holds besides A (weights, alpha, beta, gradient, sort values and int64
# indices, the solution...): 19 measured at 7.3M weights with 4 rows (`bench methods --shape small`), rounded up
VECTORS = 20


@register_method("chita", needs="gradient_rows", allocation="global", updates_weights=True,
                 description="CHITA: empirical-Fisher quadratic model, blockwise IHT + backsolve; updates the kept weights")
@register_method("chita++", needs="gradient_rows", allocation="global", updates_weights=True, iterative=True,
                 description="CHITA++: CHITA over rounds with an exponential sparsity schedule")
def chita_solve(
    A: Tensor, w_bar: Tensor, k: int, alpha: Tensor, lambda2: float, blocks: list[int]
) -> Tensor:
    """The weights (p,) minimising the quadratic model above with at most `k` non-zeros.

    `blocks` are the boundaries of the weight blocks (0, ..., p). With k >= p, w_bar itself.
    """
    p = w_bar.numel()
    if k >= p:
        return w_bar.clone()
    y = A @ w_bar
    beta = w_bar.clone()
    if alpha.norm() > 1e-8:
        beta, _ = iht_step(y, A, beta, y - A @ beta, k, alpha, lambda2, w_bar)
    threshold = beta.abs().sort(descending=True, stable=True).values[k]
    solution = torch.zeros_like(w_bar)
    for start, end in zip(blocks[:-1], blocks[1:]):
        block = slice(start, end)
        kept = int((beta[block].abs() > threshold).sum())
        if kept == 0:
            continue
        A_b, w_b = A[:, block], w_bar[block]
        solution[block] = block_solve(A_b @ w_b, A_b, beta[block], kept, alpha[block], lambda2, w_b)
    return solution


def block_solve(y: Tensor, A: Tensor, beta: Tensor, k: int, alpha: Tensor, lambda2: float, w_bar: Tensor) -> Tensor:
    """One block (the authors' `Heuristic_LS`): a thresholding step, the top-k support, its backsolve."""
    if alpha.norm() > 1e-8:
        beta, _ = iht_step(y, A, beta, y - A @ beta, k, alpha, lambda2, w_bar)
    support = beta.abs().sort(descending=True, stable=True).indices[:k]
    out = torch.zeros_like(beta)
    out[support] = backsolve(y, A[:, support], alpha[support], lambda2, w_bar[support])
    return out


def backsolve(y: Tensor, A: Tensor, alpha: Tensor, lambda2: float, w_bar: Tensor) -> Tensor:
    """argmin_w 1/2 ||y - A w||^2 + lambda2 ||w - w_bar||^2 + alpha^T w, i.e. (A^T A + 2 lambda2 I) w = b.

    With fewer rows than unknowns, through the n x n system (Woodbury), as the authors do.
    """
    n, k = A.shape
    b = A.T @ y + 2 * lambda2 * w_bar - alpha
    if n < k:
        inner = torch.eye(n, dtype=A.dtype, device=A.device) + A @ A.T / (2 * lambda2)
        return b / (2 * lambda2) - A.T @ torch.linalg.solve(inner, A @ b) / (4 * lambda2**2)
    return torch.linalg.solve(2 * lambda2 * torch.eye(k, dtype=A.dtype, device=A.device) + A.T @ A, b)


def objective(beta: Tensor, r: Tensor, alpha: Tensor, lambda2: float, w_bar: Tensor) -> Tensor:
    """1/2 ||r||^2 + lambda2 ||beta - w_bar||^2 + alpha^T beta, with r = y - A beta."""
    return 0.5 * (r @ r) + lambda2 * (beta - w_bar).square().sum() + alpha @ beta


def iht_step(
    y: Tensor, A: Tensor, beta: Tensor, r: Tensor, k: int, alpha: Tensor, lambda2: float, w_bar: Tensor,
    line_search: int = LINE_SEARCH_STEPS,
) -> tuple[Tensor, Tensor]:
    """One iterative-hard-thresholding step with line search (the authors' `prune_ls`): (beta, y - A beta).

    The step along the gradient that is optimal on the current top-k support is taken when it keeps
    that support; otherwise a shorter step that does, doubled while the thresholded objective falls.
    """
    order = beta.abs().sort(descending=True, stable=True).indices
    support, rest = order[:k], order[k:]
    to_w_bar = w_bar - beta
    grad = -(A.T @ r) + alpha - 2 * lambda2 * to_w_bar
    g_support = torch.zeros_like(grad)
    g_support[support] = grad[support]
    A_grad = A[:, support] @ grad[support]
    step = ((g_support @ alpha) - (r @ A_grad) - 2 * lambda2 * (to_w_bar @ g_support)) / (
        (A_grad @ A_grad) + 2 * lambda2 * (g_support @ g_support)
    )

    def keeps_support(t: Tensor) -> bool:
        inside = (beta[support] - t * grad[support]).abs().max()
        outside = (beta[rest] - t * grad[rest]).abs().max()
        return bool(inside >= outside - 1e-10)

    if keeps_support(step):
        new = beta - step * grad
        new[rest] = 0
        return new, y - A @ new
    t = step / 2
    for _ in range(100):
        if keeps_support(t):
            break
        t = t / 2
    best = torch.zeros_like(beta)
    best[support] = beta[support]
    best_r = y - A @ best
    best_f = objective(best, best_r, alpha, lambda2, w_bar)
    for _ in range(line_search):
        trial = beta - t * grad
        trial[trial.abs().sort(descending=True, stable=True).indices[k:]] = 0
        trial_r = y - A @ trial
        f = objective(trial, trial_r, alpha, lambda2, w_bar)
        if not f < best_f:
            break  # the authors' loop leaves its result unset when the first trial is no better: keep the thresholded beta
        best, best_r, best_f = trial, trial_r, f
        t = t * 2
    return best, best_r


def block_boundaries(sizes: list[int], block_size: int = BLOCK_SIZE) -> list[int]:
    """Block boundaries over the flattened layers (the authors' `get_blocklist_custom`).

    A layer smaller than `block_size` is one block; a larger one is cut every
    floor(size / floor(size / block_size)) weights, the remainder joining its last block.
    """
    bounds, offset = [0], 0
    for size in sizes:
        if size < block_size:
            bounds.append(offset + size)
        else:
            cuts = list(range(offset, offset + size + 1, size // (size // block_size)))
            cuts[-1] = offset + size
            bounds += cuts[1:]  # (the authors repeat the layer start: an empty block)
        offset += size
    return bounds


def available_memory() -> int:
    """Bytes of RAM this process may still allocate (MemAvailable; the cgroup limit if lower)."""
    available = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(open(path).read().strip())
            used_path = path.replace("memory.max", "memory.current").replace("limit_in_bytes", "usage_in_bytes")
            free = limit - int(open(used_path).read().strip())
            available = free if available is None else min(available, free)
        except (OSError, ValueError):
            continue
    if available is None:
        page = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        available = int(page)
    return available


def memory_needed(rows: int, weights: int) -> int:
    """Bytes CHITA holds at once: the fp32 gradient matrix (rows x weights) and its p-long vectors."""
    return 4 * weights * (rows + VECTORS)


def check_memory(method: str, rows: int, weights: int, available: int | None = None) -> None:
    """Raise MemoryError naming the shortfall when the solve would not fit in RAM."""
    needed = memory_needed(rows, weights)
    available = available_memory() if available is None else available
    if needed > available:
        gib = 2.0**30
        raise MemoryError(
            f"method {method!r} needs {needed / gib:.2f} GiB of RAM for its gradient matrix ({rows} calibration "
            f"batches x {weights:,d} prunable weights, fp32) and solver vectors, but only {available / gib:.2f} GiB "
            f"are available ({(needed - available) / gib:.2f} GiB short); use fewer calibration batches "
            f"(num_batches, at most {max(0, available // (4 * weights) - VECTORS)} fit) or exclude layers"
        )


def gradient_rows(
    model: nn.Module,
    targets: Mapping[str, Target],
    batches: Iterator[tuple[int, int, Batch]],
    loss: Callable[[nn.Module, Batch], Tensor],
    rows: int,
    *,
    masks: Mapping[str, Tensor] | None = None,
    reduce: ReduceFn | None = None,
    transfer: Callable[[Batch], Batch] | None = None,
) -> tuple[Tensor, float]:
    """(A, mean batch size): A's row r is the loss gradient of batch (r, index, batch) over every
    prunable weight, flattened in `targets` order (fp32, CPU); with `masks`, pruned weights' entries
    are 0 (their gradient through the masked weights). Rows of other processes arrive by `reduce`."""
    sizes = [t.param.numel() for t in targets.values()]
    A = torch.zeros(rows, sum(sizes), dtype=torch.float32)
    seen = torch.zeros(2, dtype=torch.float64)
    for row, index, batch in batches:
        stats = collect_gradients(model, targets, [batch], loss, transfer=transfer, batches=iter([(index, batch)]))
        grads = [stats.sums[n] * masks[n] if masks is not None else stats.sums[n] for n in targets]
        A[row] = torch.cat([g.reshape(-1).cpu() for g in grads])
        seen += torch.tensor([1.0, stats.num_samples], dtype=torch.float64)
    if reduce is not None:  # one row at a time: A itself never has to fit on the device
        device = next(iter(targets.values())).param.device
        for row in range(rows):
            A[row] = reduce(A[row].to(device)).cpu()
        seen = reduce(seen.to(device)).cpu()
    return A, float(seen[1] / max(seen[0], 1))


def chita_round(
    A: Tensor, weights: Mapping[str, Tensor], sparsity: float, batch_size: float, *, lambda_: float = LAMBDA,
    block_size: int = BLOCK_SIZE,
) -> dict[str, Tensor]:
    """One CHITA solve on the flattened `weights` (name -> current weight): name -> new weight (fp32)."""
    flat = torch.cat([w.detach().reshape(-1).float().cpu() for w in weights.values()])
    sizes = [w.numel() for w in weights.values()]
    k = int((1 - sparsity) * flat.numel())
    alpha = A.sum(0) / batch_size  # the first-order term (the authors' use_first_order)
    solved = chita_solve(A, flat, k, alpha, A.shape[0] * lambda_ / 2, block_boundaries(sizes, block_size))
    return {name: part.view_as(w) for (name, w), part in zip(weights.items(), solved.split(sizes))}


def round_sparsities(sparsity: float, rounds: int) -> list[float]:
    """The authors' exponential schedule: 1 - (1 - s)^((t+1)/T) for t < T."""
    return [1.0 - (1.0 - sparsity) ** ((t + 1) / rounds) for t in range(rounds)]
