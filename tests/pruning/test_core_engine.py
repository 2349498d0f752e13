"""`prune()` end to end on a tiny two-modality model: methods, groups, statistics, files, errors."""
import math

import pytest
import torch
from torch import nn

from mflightning import PruningResult, prune
from mflightning.pruning import collect_input_norms, find_targets, register_preset, resolve_modalities
from toy_models import GROUPS, ToyVLM, make_batches, model_inputs

METHODS = ["multiflow", "omp", "lamp", "random", "wanda", "snip", "itersnip"]


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(**model_inputs(batch)), batch["label"])


def forward_fn(model, batch):
    return model(**model_inputs(batch))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ToyVLM()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_every_method_reaches_its_sparsity_and_leaves_the_model_unchanged(model, method, sparsity):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = prune(
        model, sparsity=sparsity, method=method, calibration=make_batches(4), forward=forward_fn,
        modalities=GROUPS, exclude=[r"^head\."], loss=loss_fn, rounds=2,
    )
    prunable = sum(m.numel() for m in result.masks.values())
    # ties are pruned, so realised sparsity may exceed the target by a few weights at most
    assert sparsity <= result.sparsity <= sparsity + 8 / prunable
    assert set(result.masks) == {n for n in before if n.endswith("weight") and not n.startswith(("head", "embed"))}
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), f"prune() changed {name}"
        assert param.grad is None


def test_groups_follow_the_regex_map_and_heads_stay_dense(model):
    result = prune(model, sparsity=0.5, method="omp", modalities=GROUPS, exclude=[r"^head\."])
    assert result.groups == {
        "vision.0.weight": "vision", "vision.2.weight": "vision",
        "text.fc1.weight": "text", "text.fc2.weight": "text", "text.fuse.weight": "text",
    }
    assert set(result.group_sparsity()) == {"vision", "text"}


def test_modality_allocation_reaches_the_sparsity_in_every_group(model):
    result = prune(model, sparsity=0.6, calibration=make_batches(3), forward=forward_fn, modalities=GROUPS, exclude=["head"])
    for group, value in result.group_sparsity().items():
        assert value == pytest.approx(0.6, abs=0.01), group


def test_ablations_differ_from_multiflow(model):
    common = dict(sparsity=0.7, calibration=make_batches(3), forward=forward_fn, modalities=GROUPS, exclude=["head"])
    base = prune(model, **common)
    for options in ({"allocation": "magnitude"}, {"allocation": "global"}, {"invert": True}):
        other = prune(model, **common, **options)
        assert other.sparsity == pytest.approx(0.7, abs=0.01)
        assert any(not torch.equal(base.masks[n], other.masks[n]) for n in base.masks), options
    inverted = prune(model, **common, invert=True)
    kept = base.masks["text.fc1.weight"] & inverted.masks["text.fc1.weight"]
    assert kept.float().mean() < 0.2  # inversion keeps mostly what MultiFlow prunes


def test_statistics_leave_out_padding_tokens_but_not_vision_inputs(model):
    spec = resolve_modalities(model, GROUPS, ["head"])
    targets = find_targets(model, spec)
    batch = make_batches(1, batch_size=3)[0]
    padded = collect_input_norms(model, targets, [batch], forward=forward_fn)
    # the same statistics by hand: squared inputs of fc1 summed over the real tokens only
    mask = batch["attention_mask"].bool()
    embedded = model.embed(batch["input_ids"])[mask]
    assert torch.allclose(padded.sums["text.fc1.weight"].float(), embedded.pow(2).sum(0), rtol=1e-5)
    patches = batch["image"].reshape(-1, 12)
    assert torch.allclose(padded.sums["vision.0.weight"].float(), patches.pow(2).sum(0), rtol=1e-5)
    # without a token mask every position counts
    unmasked = collect_input_norms(model, targets, [batch], forward=forward_fn, token_mask=lambda b: None)
    all_tokens = model.embed(batch["input_ids"]).reshape(-1, 16)
    assert torch.allclose(unmasked.sums["text.fc1.weight"].float(), all_tokens.pow(2).sum(0), rtol=1e-5)
    assert padded.num_batches == 1 and padded.num_samples == 3


def test_a_shared_layer_accumulates_every_call():
    lin = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": lin, "b": lin})  # the same module reached by two names
    x = torch.randn(2, 4)
    targets = find_targets(model, resolve_modalities(model, None))
    assert list(targets) == ["a.weight"]

    def twice(m, batch):
        m["a"](batch)
        m["b"](batch)

    stats = collect_input_norms(model, targets, [x], forward=twice)
    assert torch.allclose(stats.sums["a.weight"].float(), 2 * x.pow(2).sum(0))
    assert stats.calls["a.weight"] == 2


def test_save_load_round_trip_and_rethreshold(model, tmp_path):
    result = prune(model, sparsity=0.5, calibration=make_batches(2), forward=forward_fn, modalities=GROUPS, exclude=["head"])
    path = result.save(tmp_path / "masks.safetensors", include_scores=True)
    loaded = PruningResult.load(path)
    assert loaded.method == "multiflow" and loaded.allocation == "modality"
    assert loaded.groups == result.groups and loaded.calibration == {"num_batches": 2, "num_samples": 8}
    assert all(torch.equal(loaded.masks[n], result.masks[n]) for n in result.masks)
    again = loaded.at(0.8)
    assert again.sparsity == pytest.approx(0.8, abs=0.01)
    direct = prune(model, sparsity=0.8, calibration=make_batches(2), forward=forward_fn, modalities=GROUPS, exclude=["head"])
    assert all(torch.equal(again.masks[n], direct.masks[n]) for n in direct.masks)
    mask_only = PruningResult.load(result.save(tmp_path / "only.safetensors"))
    with pytest.raises(ValueError, match="holds no scores"):
        mask_only.at(0.3)
    assert "vision" in result.report() and "total" in result.report()


def test_apply_zeroes_weights_and_matches_a_name_prefix(model):
    result = prune(model, sparsity=0.5, method="omp", modalities=GROUPS, exclude=["head"])
    wrapper = nn.Module()
    wrapper.model = model  # names gain the prefix "model."
    resolved = result.apply(wrapper)
    assert set(resolved) == {f"model.{n}" for n in result.masks}
    weight = model.text.fc1.weight
    assert torch.equal(weight == 0, ~result.masks["text.fc1.weight"])
    # and back: masks computed on the wrapper apply to the bare model
    wrapped = prune(wrapper, sparsity=0.5, method="omp", modalities=GROUPS, exclude=["head"])
    assert set(wrapped.masks_for(model)) == set(result.masks)


def test_preset_inherit_rule_gives_a_copy_its_source_mask():
    register_preset("toy-copy", {"all": r"."}, inherit=((r"^copy\.", "orig."),))
    source = nn.Module()
    source.orig = nn.Linear(6, 6)
    result = prune(source, sparsity=0.5, method="omp", modalities="toy-copy")
    task = nn.Module()
    task.orig = nn.Linear(6, 6)
    task.copy = nn.Linear(6, 6)
    task.pruning_preset = "toy-copy"
    resolved = result.masks_for(task)
    assert torch.equal(resolved["copy.weight"], resolved["orig.weight"])


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "0.5"])
def test_sparsity_outside_the_unit_interval_is_rejected(model, sparsity):
    with pytest.raises(ValueError, match="sparsity must be"):
        prune(model, sparsity=sparsity, method="omp")


def test_unknown_method_and_allocation(model):
    with pytest.raises(ValueError, match="unknown pruning method 'magic'"):
        prune(model, sparsity=0.5, method="magic")
    with pytest.raises(ValueError, match="unknown allocation 'uniform'"):
        prune(model, sparsity=0.5, method="omp", allocation="uniform")


def test_data_driven_methods_need_data(model):
    with pytest.raises(ValueError, match="needs calibration batches"):
        prune(model, sparsity=0.5)
    with pytest.raises(ValueError, match="yielded no batches"):
        prune(model, sparsity=0.5, calibration=[], forward=forward_fn)
    with pytest.raises(ValueError, match="needs `loss"):
        prune(model, sparsity=0.5, method="snip", calibration=make_batches(1))


def test_unassigned_layer_is_named(model):
    with pytest.raises(ValueError, match=r"'head.weight' \(2, 16\) matches no modality group"):
        prune(model, sparsity=0.5, method="omp", modalities=GROUPS)


def test_layer_that_never_runs_is_named(model):
    def vision_only(m, batch):
        m.vision(batch["image"])

    with pytest.raises(ValueError, match="never ran during calibration.*text.fc1.weight"):
        prune(model, sparsity=0.5, calibration=make_batches(1), forward=vision_only, modalities=GROUPS, exclude=["head"])


def test_non_finite_activations_are_reported(model):
    batches = make_batches(2)
    batches[1]["image"][0, 0, 0] = math.inf
    with pytest.raises(FloatingPointError, match="batch 1.*vision.0.weight"):
        prune(model, sparsity=0.5, calibration=batches, forward=forward_fn, modalities=GROUPS, exclude=["head"])


def test_mask_file_that_does_not_match_the_model(model, tmp_path):
    path = prune(model, sparsity=0.5, method="omp", exclude=["head"]).save(tmp_path / "m.safetensors")
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="mask names are not parameters"):
        PruningResult.load(path).apply(other)
    wider = ToyVLM(dim=8)
    with pytest.raises(ValueError, match=r"mask for 'text.fc1.weight' has shape \(32, 16\).*\(16, 8\)"):
        PruningResult.load(path).apply(wider)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        PruningResult.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        PruningResult.load(tmp_path / "missing.safetensors")


def test_bad_regex_is_named(model):
    with pytest.raises(ValueError, match=r"group 'text': invalid regex"):
        prune(model, sparsity=0.5, method="omp", modalities={"text": "(unclosed"})


def test_layers_sharing_an_input_get_its_statistics_and_in_place_changes_are_seen():
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            self.q(x)
            self.k(x)
            x.mul_(2.0)  # an in-place change between two layers reading the same tensor
            self.v(x)

    model = QKV()
    x = torch.randn(3, 5, 4)
    expected = x.pow(2).sum((0, 1))
    targets = find_targets(model, resolve_modalities(model, None))
    stats = collect_input_norms(model, targets, [x.clone()], forward=lambda m, b: m(b), token_mask=lambda b: None)
    assert torch.allclose(stats.sums["q.weight"].float(), expected)
    assert torch.allclose(stats.sums["k.weight"].float(), expected)
    assert torch.allclose(stats.sums["v.weight"].float(), 4 * expected)
