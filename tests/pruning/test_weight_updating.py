"""SparseGPT, CHITA and CHITA++: their solvers against hand-written references, and their carried weights."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from mflightning.pruning import PruningResult, prune
from mflightning.pruning import chita as C
from mflightning.pruning.sparsegpt import sparsegpt_layer

from toy_models import GROUPS, ToyModule, ToyVLM, make_batches, model_inputs, quiet_trainer


# ---------------------------------------------------------------- SparseGPT against explicit OBS steps
def obs_reference(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.0, nm: tuple[int, int] | None = None):
    """Column by column with explicit inverses: column i is pruned or kept with the columns left of it
    frozen (inverse Hessian of columns i..d-1); a pruned weight's error moves onto the columns right of
    it by the OBS update dw = -(w_i / [H_F^-1]_00) [H_F^-1]_0,: . The mask is chosen once up front
    (unstructured: the lowest w_i^2 / [H_F_i^-1]_00 of the matrix) or at each group's first column (N:M)."""
    H = hessian.double().clone()
    H.diagonal().add_(0.01 * H.diagonal().mean())
    W = weight.double().clone()
    rows, d = W.shape
    inverses = [torch.linalg.inv(H[i:, i:]) for i in range(d)]
    pruned = torch.zeros(rows, d, dtype=torch.bool)
    if nm is None:
        saliency = torch.stack([W[:, i] ** 2 / inverses[i][0, 0] for i in range(d)], 1)
        pruned.view(-1)[saliency.reshape(-1).argsort()[: round(sparsity * W.numel())]] = True
    for i in range(d):
        if nm is not None and i % nm[1] == 0:
            saliency = torch.stack([W[:, j] ** 2 / inverses[j][0, 0] for j in range(i, i + nm[1])], 1)
            lowest = saliency.argsort(dim=1)[:, : nm[1] - nm[0]]
            pruned[:, i:i + nm[1]].scatter_(1, lowest, True)
        for r in range(rows):
            if pruned[r, i]:
                W[r, i:] -= W[r, i] / inverses[i][0, 0] * inverses[i][0, :]
    W[pruned] = 0
    return ~pruned, W


def tiny_layer(rows=3, d=6, tokens=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, d, generator=g) @ torch.randn(d, d, generator=g)  # correlated inputs
    return torch.randn(rows, d, generator=g), X.T @ X


def test_sparsegpt_matches_hand_written_obs_unstructured():
    weight, hessian = tiny_layer()
    mask, new = sparsegpt_layer(weight, hessian, 0.5)
    ref_mask, ref_new = obs_reference(weight, hessian, 0.5)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new, ref_new.float(), rtol=1e-4, atol=1e-5)
    assert not torch.equal(new[mask], weight[mask])  # the kept weights did move


@pytest.mark.parametrize("block_size", [128, 4])  # one block, or two: the errors cross the block boundary
def test_sparsegpt_matches_hand_written_obs_n_m(block_size):
    weight, hessian = tiny_layer(rows=4, d=8, seed=1)
    mask, new = sparsegpt_layer(weight, hessian, 0.5, "2:4", block_size=block_size)
    ref_mask, ref_new = obs_reference(weight, hessian, nm=(2, 4))
    assert torch.equal(mask, ref_mask)
    assert (mask.view(4, 2, 4).sum(-1) == 2).all()
    torch.testing.assert_close(new, ref_new.float(), rtol=1e-4, atol=1e-5)


def test_sparsegpt_reduces_the_layer_output_error_below_masking_alone():
    weight, hessian = tiny_layer(rows=8, d=16, tokens=64, seed=2)
    mask, new = sparsegpt_layer(weight, hessian, 0.5, block_size=4)  # several blocks
    error = lambda w: torch.einsum("ri,ij,rj->", weight - w, hessian, weight - w)  # noqa: E731  ||X (W - W')^T||^2
    assert error(new) < error(weight * mask)
    assert (new[~mask] == 0).all() and mask.float().mean() == 0.5


# ---------------------------------------------------------------- CHITA's solver against enumeration
def quadratic(w, A, w_bar, alpha, lambda2):
    r = A @ (w_bar - w)
    return float(0.5 * r @ r + lambda2 * (w - w_bar).square().sum() + alpha @ w)


def best_on(support, A, w_bar, alpha, lambda2):
    w = torch.zeros_like(w_bar)
    idx = torch.tensor(support)
    w[idx] = C.backsolve(A @ w_bar, A[:, idx], alpha[idx], lambda2, w_bar[idx])
    return w


@pytest.mark.parametrize("seed", range(8))
def test_chita_support_is_at_least_as_good_as_magnitudes_and_often_optimal(seed):
    """9 weights keeping 4, all 126 supports enumerated. At w_bar the quadratic term has no gradient,
    so the authors' single thresholding step moves the support only through the first-order term:
    CHITA mostly keeps magnitude's support with better weights. (It is not a guarantee: with seed
    20 of this family the block step ends behind magnitude, 8.90 against 7.15.)"""
    g = torch.Generator().manual_seed(seed)
    n, p, k = 5, 9, 4
    A = torch.randn(n, p, generator=g, dtype=torch.float64)
    w_bar = torch.randn(p, generator=g, dtype=torch.float64)
    alpha, lambda2 = 0.1 * A.sum(0), 0.05
    chita = C.chita_solve(A, w_bar, k, alpha, lambda2, [0, p])
    assert int((chita != 0).sum()) == k
    values = {s: quadratic(best_on(s, A, w_bar, alpha, lambda2), A, w_bar, alpha, lambda2)
              for s in itertools.combinations(range(p), k)}
    magnitude = tuple(sorted(w_bar.abs().argsort(descending=True)[:k].tolist()))
    ours = quadratic(chita, A, w_bar, alpha, lambda2)
    # the backsolve is exact on its support: the value is the enumeration's for that support
    assert ours == pytest.approx(values[tuple(sorted(chita.nonzero().view(-1).tolist()))], rel=1e-9)
    assert ours <= values[magnitude] + 1e-9
    if seed in (1, 3, 7):  # instances where the heuristic finds the optimum (found by enumeration)
        assert ours == pytest.approx(min(values.values()), rel=1e-9)


def test_chita_block_boundaries_follow_the_authors_rule():
    # 25 000 weights in blocks of 10 000: two blocks of 12 500; a small layer is one block
    assert C.block_boundaries([25_000, 300], 10_000) == [0, 12_500, 25_000, 25_300]
    assert C.block_boundaries([30_001], 10_000) == [0, 10_000, 20_000, 30_001]


def test_chita_memory_check_names_the_shortfall():
    with pytest.raises(MemoryError, match=r"gradient matrix \(100 calibration batches x 1,000,000.*short"):
        C.check_memory("chita", 100, 1_000_000, available=2**20)


# ---------------------------------------------------------------- prune(), the result and the callback
COMMON = dict(modalities=GROUPS, exclude=[r"^(model\.)?head\."])
WEIGHT_UPDATING = ["sparsegpt", "chita", "chita++"]


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(**model_inputs(batch)), batch["label"])


def forward(model, batch):
    return model(**model_inputs(batch))


def pruned(method, model=None, **settings):
    model = model or ToyVLM()
    settings = {**COMMON, "method": method, "rounds": 2, **settings}
    return model, prune(model, calibration=make_batches(4, seed=3), forward=forward, loss=loss_fn, **settings)


@pytest.mark.parametrize("method", WEIGHT_UPDATING)
def test_weight_updating_methods_carry_their_weights_and_apply_writes_them(method, tmp_path):
    model, result = pruned(method, sparsity=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert set(result.weights) == set(result.masks)
    assert result.sparsity == pytest.approx(0.5, abs=0.02)
    moved = 0
    for name, weight in result.weights.items():
        mask = result.masks[name]
        assert (weight[~mask] == 0).all(), name
        moved += int((weight[mask] != before[name][mask]).sum())
    assert moved > 0  # the kept weights were solved, not copied
    result.apply(model)
    params = dict(model.named_parameters())
    for name, weight in result.weights.items():
        assert torch.equal(params[name].detach(), weight.to(params[name].dtype)), name
    assert torch.equal(params["head.weight"], before["head.weight"])  # excluded: untouched
    # a file holds the weights; the masks alone cannot be had from it
    loaded = PruningResult.load(result.save(tmp_path / "masks.safetensors"))
    assert all(torch.equal(loaded.weights[n], w) for n, w in result.weights.items())
    with pytest.raises(ValueError, match="carry no weights"):
        PruningResult(masks=result.masks, groups=result.groups, method=method, target_sparsity=0.5,
                      allocation=result.allocation)
    assert loaded.at(0.5) is loaded
    with pytest.raises(ValueError, match=r"solved for sparsity 0.5.*re-run prune"):
        loaded.at(0.6)


def test_prune_leaves_the_model_unchanged_and_refuses_meaningless_settings():
    model = ToyVLM()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruned("chita++", model, sparsity=0.6)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="invert"):
        pruned("sparsegpt", sparsity=0.5, invert=True)
    with pytest.raises(ValueError, match="no N:M variant"):
        pruned("chita", pattern="2:4")
    with pytest.raises(ValueError, match="allocation='modality' cannot apply"):
        pruned("sparsegpt", sparsity=0.5, allocation="modality")


def test_sparsegpt_n_m_through_prune_and_its_pad_filtered_hessians():
    _, result = pruned("sparsegpt", pattern="2:4")
    for name, mask in result.masks.items():
        assert (mask.view(mask.shape[0], -1, 4).sum(-1) == 2).all(), name
    # the Hessian of text.fc1 is X^T X over the non-PAD tokens only: a PAD token's embedding changes nothing
    batches = make_batches(4, seed=3)
    padded = [dict(b, input_ids=b["input_ids"] + 7 * (1 - b["attention_mask"])) for b in batches]
    model = ToyVLM()
    a = prune(model, calibration=batches, forward=forward, method="sparsegpt", sparsity=0.5, **COMMON)
    b = prune(model, calibration=padded, forward=forward, method="sparsegpt", sparsity=0.5, **COMMON)
    assert torch.equal(a.masks["text.fc1.weight"], b.masks["text.fc1.weight"])
    torch.testing.assert_close(a.weights["text.fc1.weight"], b.weights["text.fc1.weight"])


def test_chita_refuses_a_gradient_matrix_that_does_not_fit(monkeypatch):
    monkeypatch.setattr(C, "available_memory", lambda: 10_000)
    with pytest.raises(MemoryError, match="GiB short"):
        pruned("chita", sparsity=0.5)


@pytest.mark.parametrize("method", ["sparsegpt", "chita"])
def test_the_callback_fine_tunes_from_the_solved_weights(method, tmp_path):
    """lr=0: after the fit every masked weight is exactly the solved one; lr>0: the pruned stay zero."""
    from mflightning import MultiFlowCallback

    for lr in (0.0, 0.05):
        module = ToyModule(lr=lr, weight_decay=0.0)
        callback = MultiFlowCallback(0.5, method=method, calibration=make_batches(4, seed=3),
                                     loss=lambda m, b: loss_fn(m.model, b), save_masks=tmp_path / f"{lr}.safetensors",
                                     save_scores=True, **COMMON)
        quiet_trainer(tmp_path, max_steps=3, callbacks=[callback]).fit(
            module, torch.utils.data.DataLoader(make_batches(3), batch_size=None))
        params = dict(module.model.named_parameters())
        for name, weight in callback.result.weights.items():
            name = name.removeprefix("model.")
            if lr == 0.0:
                assert torch.equal(params[name].detach(), weight), name
                assert torch.equal(PruningResult.load(tmp_path / "0.0.safetensors").weights["model." + name], weight)
            else:
                assert (params[name].detach()[weight == 0] == 0).all(), name
                assert not torch.equal(params[name].detach(), weight), name


def test_two_processes_solve_what_one_process_solves(tmp_path):
    """DDP on two CPU processes (the callback, a subprocess script): Hessians and gradient rows summed
    over the ranks give every rank the masks and solved weights of one process calibrating on all
    batches (CHITA++'s rows land at their global batch index), written on every rank before training;
    under FSDP2 each rank writes its shard of SparseGPT's solved weights."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from weight_updating_ddp_script import loss as module_loss

    script = Path(__file__).with_name("weight_updating_ddp_script.py")
    env = {**os.environ, "PYTHONPATH": str(script.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"2-rank{r}.pt") for r in (0, 1)]
    for run in ("sparsegpt", "chita++", "sparsegpt-fsdp2"):
        method = run.split("-")[0]
        module = ToyModule(lr=0.0, weight_decay=0.0)
        single = prune(module, method=method, sparsity=0.6, rounds=2, calibration=make_batches(5, seed=3),
                       forward=lambda m, b: m.calibration_step(b), loss=module_loss,
                       modalities=GROUPS, exclude=[r"head\."])
        if not run.endswith("fsdp2"):  # (FSDP2: a rank one batch short runs one uncounted forward)
            assert ranks[0][run]["calls"] + ranks[1][run]["calls"] == module.calibration_calls  # each batch once
        assert ranks[0][run]["calibration"]["num_batches"] == single.calibration["num_batches"] == 5
        for name, mask in single.masks.items():
            for rank in ranks:
                assert torch.equal(rank[run]["masks"][name], mask), (run, name)
                torch.testing.assert_close(rank[run]["weights"][name], single.weights[name], rtol=1e-5, atol=1e-6)
            assert torch.equal(ranks[0][run]["weights"][name], ranks[1][run]["weights"][name])


def test_chita_round_uses_the_authors_first_order_term_and_ridge():
    """One round on two layers: alpha = A.sum(0) / batch size, lambda2 = n * 1e-5 / 2, the authors' blocks."""
    g = torch.Generator().manual_seed(5)
    weights = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(2, 5, generator=g)}
    A = torch.randn(3, 22, generator=g)
    flat = torch.cat([w.reshape(-1) for w in weights.values()])
    got = C.chita_round(A, weights, 0.5, batch_size=0.25)
    expected = C.chita_solve(A, flat, 11, A.sum(0) / 0.25, 3 * 1e-5 / 2, [0, 12, 22])
    without_alpha = C.chita_solve(A, flat, 11, torch.zeros(22), 3 * 1e-5 / 2, [0, 12, 22])
    assert not torch.allclose(expected, without_alpha)  # the first-order term matters here
    torch.testing.assert_close(torch.cat([got["a"].reshape(-1), got["b"].reshape(-1)]), expected)
