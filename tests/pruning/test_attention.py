"""torch-native attention (`nn.MultiheadAttention`, `nn.TransformerEncoderLayer`) is pruned from the inputs
its projection weights really multiply, exactly as an explicit implementation with nn.Linear layers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mflightning import prune
from mflightning.pruning import CalibrationError, collect_gradients, collect_input_norms, find_targets, resolve_modalities

E, HEADS, FFN = 16, 2, 32


# ---------------------------------------------------------------------- the two implementations
class TorchStack(nn.Module):
    """Two torch encoder layers; `src` is (B, L, E) when batch_first, else (L, B, E)."""

    def __init__(self, batch_first: bool):
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, HEADS, FFN, dropout=0.0, batch_first=batch_first)
        # the nested-tensor conversion only exists for batch_first; the fast paths must be off anyway
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)

    def forward(self, src, attention_mask):
        return self.encoder(src, src_key_padding_mask=~attention_mask.bool())


class ExplicitAttention(nn.Module):
    """Self-attention with a fused qkv nn.Linear and an output nn.Linear, batch-first."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)
        self.out_proj = nn.Linear(E, E)

    def forward(self, x, pad):
        b, length, _ = x.shape
        q, k, v = (t.reshape(b, length, HEADS, E // HEADS).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        bias = torch.zeros(b, length).masked_fill(pad, float("-inf"))[:, None, None, :]
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out_proj(heads.transpose(1, 2).reshape(b, length, E))


class ExplicitLayer(nn.Module):
    """Post-norm encoder layer as torch's, built from nn.Linear modules."""

    def __init__(self, source: nn.TransformerEncoderLayer):
        super().__init__()
        self.self_attn = ExplicitAttention()
        self.linear1, self.linear2 = nn.Linear(E, FFN), nn.Linear(FFN, E)
        self.norm1, self.norm2 = nn.LayerNorm(E), nn.LayerNorm(E)
        with torch.no_grad():
            self.self_attn.qkv.weight.copy_(source.self_attn.in_proj_weight)
            self.self_attn.qkv.bias.copy_(source.self_attn.in_proj_bias)
            self.self_attn.out_proj.load_state_dict(source.self_attn.out_proj.state_dict())
            for name in ("linear1", "linear2", "norm1", "norm2"):
                getattr(self, name).load_state_dict(getattr(source, name).state_dict())

    def forward(self, x, pad):
        x = self.norm1(x + self.self_attn(x, pad))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class ExplicitStack(nn.Module):
    """The same computation batch-first throughout, so its Linear inputs are (B, L, ...)."""

    def __init__(self, source: TorchStack, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(ExplicitLayer(layer) for layer in source.encoder.layers)

    def forward(self, src, attention_mask):
        x = src if self.batch_first else src.transpose(0, 1)
        for layer in self.encoder.layers:
            x = layer(x, ~attention_mask.bool())
        return x if self.batch_first else x.transpose(0, 1)


def explicit_name(name: str) -> str:
    """The explicit stack's name for a torch stack's parameter."""
    return name.replace("self_attn.in_proj_weight", "self_attn.qkv.weight")


def batches(batch_first: bool, batch: int, length: int, n: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(1, length + 1, (batch,), generator=g)
        lengths[0] = length
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        src = torch.randn(batch, length, E, generator=g)
        out.append({"src": src if batch_first else src.transpose(0, 1).contiguous(), "attention_mask": mask})
    return out


def run(model, batch):
    return model(batch["src"], batch["attention_mask"])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("method", ["multiflow", "wanda"])
@pytest.mark.parametrize("filtered", [True, False], ids=["pad-filtered", "all-tokens"])
@pytest.mark.parametrize("shape", [(3, 5), (4, 4)], ids=["B3xL5", "B4xL4"])
def test_encoder_layer_stack_gets_the_masks_of_an_explicit_linear_implementation(batch_first, method, filtered, shape):
    torch.manual_seed(0)
    native = TorchStack(batch_first).eval()
    explicit = ExplicitStack(native, batch_first).eval()
    data = batches(batch_first, *shape)
    # the two compute the same function (with gradients on, so torch takes its slow path, as calibration does)
    assert torch.allclose(run(native, data[0]), run(explicit, data[0]), atol=1e-5)
    common = dict(sparsity=0.5, method=method, calibration=data, forward=run)
    if not filtered:
        common["token_mask"] = lambda batch: None
    got = prune(native, **common)
    want = prune(explicit, **common)
    assert {explicit_name(n) for n in got.masks} == set(want.masks)
    assert len(got.masks) == 8  # in_proj, out_proj, linear1, linear2 per layer: none left dense
    for name, mask in got.masks.items():
        assert torch.equal(mask, want.masks[explicit_name(name)]), name
    assert got.calibration == want.calibration


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_statistics_match_the_explicit_inputs_with_padding_left_out(batch_first):
    torch.manual_seed(1)
    native = TorchStack(batch_first)
    explicit = ExplicitStack(native, batch_first)
    data = batches(batch_first, 3, 5)
    got = collect_input_norms(native, find_targets(native, resolve_modalities(native, None)), data, forward=run)
    want = collect_input_norms(explicit, find_targets(explicit, resolve_modalities(explicit, None)), data, forward=run)
    for name, value in got.sums.items():
        assert torch.allclose(value, want.sums[explicit_name(name)], rtol=1e-5), name
    # padding really was left out: the first layer's in_proj saw the real tokens of the input only
    tokens = [b["src"] if batch_first else b["src"].transpose(0, 1) for b in data]
    real = torch.cat([t[b["attention_mask"].bool()] for t, b in zip(tokens, data)])
    assert torch.allclose(got.sums["encoder.layers.0.self_attn.in_proj_weight"].float(), real.pow(2).sum(0), rtol=1e-5)
    assert set(got.calls.values()) == {len(data)}


def test_calibration_leaves_the_modules_and_the_fast_path_flag_as_they_were():
    torch.manual_seed(0)
    native = TorchStack(batch_first=True)
    attention = native.encoder.layers[0].self_attn
    previous = torch.backends.mha.get_fastpath_enabled()
    try:
        for flag in (True, False):
            torch.backends.mha.set_fastpath_enabled(flag)
            prune(native, sparsity=0.5, calibration=batches(True, 3, 5, n=1), forward=run)
            assert torch.backends.mha.get_fastpath_enabled() is flag
            assert "forward" not in attention.__dict__
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    assert native.training  # and its own mode came back


def test_a_failing_forward_still_restores_the_attention_modules():
    torch.manual_seed(0)
    native = TorchStack(batch_first=True)
    attention = native.encoder.layers[1].self_attn
    targets = find_targets(native, resolve_modalities(native, None))

    def fails_inside_attention(model, batch):
        attention.register_forward_pre_hook(lambda *a: 1 / 0)
        run(model, batch)

    with pytest.raises(CalibrationError, match="ZeroDivisionError"):
        collect_input_norms(native, targets, batches(True, 3, 5, n=1), forward=fails_inside_attention)
    attention._forward_pre_hooks.clear()
    assert "forward" not in attention.__dict__
    assert torch.backends.mha.get_fastpath_enabled()


# ---------------------------------------------------------------------- nn.MultiheadAttention directly
def attention_by_hand(mha: nn.MultiheadAttention, query, key, value):
    """Concatenated head outputs (the out_proj input) of a batch-first MHA without masks, and its projections."""
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    b, lq, _ = query.shape
    split = lambda t: t.reshape(b, t.shape[1], mha.num_heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(F.linear(query, wq, bq)), split(F.linear(key, wk, bk)), split(F.linear(value, wv, bv))
    weights = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, lq, mha.embed_dim)


def mha_stats(mha, calls, token_mask=lambda b: None, **spec):
    targets = find_targets(mha, resolve_modalities(mha, None, **spec))
    return targets, collect_input_norms(mha, targets, calls, forward=lambda m, b: m(*b), token_mask=token_mask)


@pytest.mark.parametrize("batch_first", [True, False])
def test_separate_q_k_v_weights_get_query_key_and_value(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, kdim=6, vdim=10, batch_first=batch_first)
    query, key, value = torch.randn(3, 5, E), torch.randn(3, 7, 6), torch.randn(3, 7, 10)
    layout = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    targets, stats = mha_stats(mha, [(layout(query), layout(key), layout(value))])
    assert set(targets) == {"q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"}
    assert torch.allclose(stats.sums["q_proj_weight"].float(), query.pow(2).sum((0, 1)), rtol=1e-5)
    assert torch.allclose(stats.sums["k_proj_weight"].float(), key.pow(2).sum((0, 1)), rtol=1e-5)
    assert torch.allclose(stats.sums["v_proj_weight"].float(), value.pow(2).sum((0, 1)), rtol=1e-5)
    heads = attention_by_hand(mha, query, key, value)
    assert torch.allclose(stats.sums["out_proj.weight"].float(), heads.pow(2).sum((0, 1)), rtol=1e-4)
    assert stats.calls == dict.fromkeys(targets, 1)


def test_packed_cross_attention_sums_every_distinct_input_it_multiplies():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    query, memory, other = torch.randn(2, 4, E), torch.randn(2, 6, E), torch.randn(2, 6, E)
    _, shared = mha_stats(mha, [(query, memory, memory)])  # key is value: query and memory
    expected = query.pow(2).sum((0, 1)) + memory.pow(2).sum((0, 1))
    assert torch.allclose(shared.sums["in_proj_weight"].float(), expected, rtol=1e-5)
    _, distinct = mha_stats(mha, [(query, memory, other)])
    assert torch.allclose(distinct.sums["in_proj_weight"].float(), expected + other.pow(2).sum((0, 1)), rtol=1e-5)
    heads = attention_by_hand(mha, query, memory, other)
    assert torch.allclose(distinct.sums["out_proj.weight"].float(), heads.pow(2).sum((0, 1)), rtol=1e-4)


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_filters_query_tokens_and_leaves_a_longer_memory_alone(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
    query, memory = torch.randn(2, 4, E), torch.randn(2, 6, E)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    layout = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    kv = layout(memory)  # one tensor for key and value
    _, stats = mha_stats(mha, [(layout(query), kv, kv)], token_mask=lambda b: mask)
    real = query[mask.bool()]
    expected = real.pow(2).sum(0) + memory.pow(2).sum((0, 1))
    assert torch.allclose(stats.sums["in_proj_weight"].float(), expected, rtol=1e-5)
    heads = attention_by_hand(mha, query, memory, memory)[mask.bool()]
    assert torch.allclose(stats.sums["out_proj.weight"].float(), heads.pow(2).sum(0), rtol=1e-4)


def test_unbatched_attention_is_never_filtered():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    x = torch.randn(5, E)  # (L, E): no batch dim, so a (B, L) mask cannot apply
    mask = torch.tensor([[1, 1, 0, 0, 0]])
    _, stats = mha_stats(mha, [(x, x, x)], token_mask=lambda b: mask)
    assert torch.allclose(stats.sums["in_proj_weight"].float(), x.pow(2).sum(0), rtol=1e-5)
    heads = attention_by_hand(mha, x[None], x[None], x[None])[0]
    assert torch.allclose(stats.sums["out_proj.weight"].float(), heads.pow(2).sum(0), rtol=1e-4)


def test_attention_weights_can_be_left_dense_and_get_gradients_for_snip():
    torch.manual_seed(0)
    native = TorchStack(batch_first=True)
    data = batches(True, 3, 5, n=2)
    dense_in = prune(native, sparsity=0.5, calibration=data, forward=run, exclude=[r"in_proj_weight$"])
    assert not any(n.endswith("in_proj_weight") for n in dense_in.masks)
    assert any(n.endswith("out_proj.weight") for n in dense_in.masks)
    targets = find_targets(native, resolve_modalities(native, None))
    grads = collect_gradients(native, targets, data, lambda m, b: run(m, b).square().mean())
    assert grads.calls["encoder.layers.0.self_attn.in_proj_weight"] == 2
    assert grads.sums["encoder.layers.0.self_attn.in_proj_weight"].abs().sum() > 0


def test_an_attention_subclass_that_bypasses_the_torch_function_is_named():
    class OwnForward(nn.MultiheadAttention):
        def forward(self, query, key, value, **kwargs):
            return F.linear(query, self.out_proj.weight), None

    mha = OwnForward(E, HEADS, batch_first=True)
    x = torch.randn(2, 3, E)
    with pytest.raises(CalibrationError, match="ran without calling F.multi_head_attention_forward") as info:
        mha_stats(mha, [(x, x, x)])
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "forward" not in mha.__dict__
