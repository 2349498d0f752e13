"""MaskKeeper without Lightning: the exact part of mask upkeep, on torch's own optimizers."""
import pytest
import torch
from torch import nn

from mflightning.pruning.upkeep import MaskKeeper


def model_and_masks(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    masks = {"0.weight": torch.rand(8, 6) > 0.5, "2.weight": torch.rand(3, 8) > 0.3}
    return model, masks


def pruned_are_zero(model, masks):
    params = dict(model.named_parameters())
    return all((params[n].detach()[~m] == 0).all() for n, m in masks.items())


def step(model, optimizer, keeper=None):
    optimizer.zero_grad()
    model(torch.randn(5, 6)).square().mean().backward()
    if keeper is not None:
        keeper.zero_gradients(optimizer)
    optimizer.step()


def test_rezeroing_after_steps_beats_momentum_that_predates_the_masks():
    """Momentum built up before pruning moves zeroed weights again: only the post-step re-zeroing stops it."""
    model, masks = model_and_masks()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):  # dense training: momentum buffers fill up
        step(model, optimizer)
    keeper = MaskKeeper(model, masks)
    keeper.zero_weights()
    # gradient zeroing alone is not enough: the momentum buffer still pushes pruned weights
    step(model, optimizer, keeper)
    assert not pruned_are_zero(model, masks)
    keeper.attach(optimizer)
    for _ in range(3):
        step(model, optimizer, keeper)
        assert pruned_are_zero(model, masks)
    keeper.detach()
    step(model, optimizer, keeper)
    assert not pruned_are_zero(model, masks), "detach() must remove the post-step hook"


def test_gradients_of_pruned_entries_are_zero_and_kept_entries_untouched():
    model, masks = model_and_masks()
    keeper = MaskKeeper(model, masks)
    model(torch.randn(4, 6)).sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    keeper.zero_gradients()
    for name, p in model.named_parameters():
        if name in masks:
            assert (p.grad[~masks[name]] == 0).all()
            assert torch.equal(p.grad[masks[name]], before[name][masks[name]])
        else:
            assert torch.equal(p.grad, before[name]), "unmasked parameters keep their gradient"


def test_a_parameter_group_added_after_the_first_step_is_masked_from_its_first_step():
    model, masks = model_and_masks()
    first, second = model[0], model[2]
    optimizer = torch.optim.AdamW(first.parameters(), lr=0.1)
    keeper = MaskKeeper(model, masks)
    keeper.zero_weights()
    keeper.attach(optimizer)
    step(model, optimizer, keeper)  # the pairs of this optimizer are cached here
    optimizer.add_param_group({"params": list(second.parameters()), "lr": 0.5})
    step(model, optimizer, keeper)
    assert pruned_are_zero(model, masks)
    assert (second.weight.grad[~masks["2.weight"]] == 0).all()


def test_fused_upkeep_handles_several_dtypes():
    model, masks = model_and_masks()
    model[2].to(torch.float64)
    keeper = MaskKeeper(model, masks)
    keeper.zero_weights()
    assert pruned_are_zero(model, masks)
    assert model[2].weight.dtype == torch.float64


def test_measured_sparsity_counts_only_masked_layers_per_group():
    model, masks = model_and_masks()
    keeper = MaskKeeper(model, masks, groups={"0.weight": "a", "2.weight": "b"})
    keeper.zero_weights()
    figures = keeper.measured_sparsity()
    assert figures["a"] == pytest.approx(1 - masks["0.weight"].float().mean().item())
    assert figures["b"] == pytest.approx(1 - masks["2.weight"].float().mean().item())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert figures["total"] == pytest.approx(pruned / (48 + 24))
    assert keeper.numel() == {"a": 48, "b": 24}


def test_bad_masks_name_the_layer():
    model, masks = model_and_masks()
    with pytest.raises(ValueError, match="first: \\['nope.weight'\\]"):
        MaskKeeper(model, {"nope.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'0.weight'.*\\(6, 8\\).*\\(8, 6\\)"):
        MaskKeeper(model, {"0.weight": torch.ones(6, 8, dtype=torch.bool)})


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (16, 13), (2, 3, 4)])
def test_packed_masks_unpack_bit_for_bit(shape):
    from mflightning.pruning.upkeep import pack_mask, unpack_mask

    mask = torch.rand(shape) > 0.6
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, list(shape)), mask)
    with pytest.raises(ValueError, match="needs"):
        unpack_mask(packed[:-1] if packed.numel() > 1 else torch.zeros(3, dtype=torch.uint8), shape)


def test_cpu_masking_in_buffer_chunks_equals_a_masked_fill(monkeypatch):
    """The CPU path copies the mask into an integer buffer chunk by chunk: layers larger than a chunk,
    bf16, fp16, fp64 and non-contiguous gradients must come out exactly as a masked fill."""
    import mflightning.pruning.upkeep as upkeep

    monkeypatch.setattr(upkeep, "_CPU_CHUNK", 7)  # force several chunks per layer
    torch.manual_seed(0)
    tensors = [torch.randn(5, 6), torch.randn(4, 4).to(torch.bfloat16), torch.randn(6, 5).t(),
               torch.randn(3, 3).half(), torch.randn(9).double()]
    masks = [torch.rand(t.shape) > 0.5 for t in tensors]
    expected = [t.masked_fill(~m, 0) for t, m in zip(tensors, masks)]
    upkeep._fused_mul(list(zip(tensors, masks)), {})
    for got, want in zip(tensors, expected):
        assert torch.equal(got, want) and got.dtype == want.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_pruned_entries_become_exact_zeros_whatever_they_held(dtype, contiguous):
    """NaN, inf and -0.0 at pruned entries become +0.0 (a multiply would leave NaN); kept entries,
    non-finite ones included, keep their exact bits."""
    from mflightning.pruning.upkeep import _fused_mul

    values = torch.tensor([[float("nan"), float("inf"), -float("inf"), -0.0, 1.5, float("nan")]] * 2, dtype=dtype)
    kept = torch.tensor([[False, False, False, False, True, True], [True, True, True, True, False, False]])
    tensor = values.clone() if contiguous else values.t().clone().t()
    _fused_mul([(tensor, kept)], {})
    pruned = tensor[~kept]
    assert pruned.isfinite().all() and (pruned == 0).all() and not torch.signbit(pruned).any()
    bits = torch.int64 if dtype == torch.float64 else (torch.int16 if dtype.itemsize == 2 else torch.int32)
    assert torch.equal(tensor.contiguous().view(bits)[kept], values.view(bits)[kept])


def test_keeper_zeroes_non_finite_weights_and_gradients_at_pruned_entries():
    """After a step that wrote NaN/inf everywhere, pruned weights and gradients are exact zeros."""
    model = nn.Linear(4, 3)
    kept = torch.rand(3, 4) > 0.5
    keeper = MaskKeeper(model, {"weight": kept})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    keeper.attach(optimizer)
    model.weight.grad = torch.full((3, 4), float("inf"))
    keeper.zero_gradients(optimizer)
    assert (model.weight.grad[~kept] == 0).all() and model.weight.grad[kept].isinf().all()
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    optimizer.step()  # the post-hook re-zeroes
    assert (model.weight[~kept] == 0).all() and model.weight[kept].isnan().all()
    assert keeper.measured_sparsity()["total"] == pytest.approx(float((~kept).float().mean()))
