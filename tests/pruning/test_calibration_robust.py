"""Calibration on models and data that are not the happy path: keyword calls, frozen submodules,
inference mode, failing forwards, DistributedSampler loaders, tied embeddings, declared image groups."""
import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from mflightning import prune
from mflightning.pruning import (
    CalibrationError,
    collect_gradients,
    collect_input_norms,
    find_targets,
    register_preset,
    resolve_modalities,
)
from mflightning.pruning.stats import iterate_shard
from toy_models import GROUPS, ToyVLM, make_batches, model_inputs


def forward_fn(model, batch):
    return model(**model_inputs(batch))


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(**model_inputs(batch)), batch["label"])


def all_targets(model, modalities=None, **kwargs):
    return find_targets(model, resolve_modalities(model, modalities, **kwargs))


# ---------------------------------------------------------------------- keyword calls
class KeywordCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(input=x)


def test_a_layer_called_with_a_keyword_input_gets_its_statistics():
    model = KeywordCalls()
    x = torch.randn(2, 5, 4)
    stats = collect_input_norms(model, all_targets(model), [x], forward=lambda m, b: m(b), token_mask=lambda b: None)
    assert torch.allclose(stats.sums["fc.weight"].float(), x.pow(2).sum((0, 1)))
    assert stats.calls["fc.weight"] == 1


# ---------------------------------------------------------------------- train/eval modes
class Distillation(nn.Module):
    """A trained student next to a frozen teacher kept in eval mode."""

    def __init__(self):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        self.teacher = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()

    def forward(self, x):
        return self.student(x) + self.teacher(x)


def modes(model):
    return {name: m.training for name, m in model.named_modules()}


def test_calibration_gives_every_submodule_its_own_mode_back():
    model = Distillation()
    before = modes(model)
    assert before["teacher"] is False and before["student"] is True
    targets = all_targets(model)
    data = [torch.randn(3, 4) for _ in range(2)]
    collect_input_norms(model, targets, data, forward=lambda m, b: m(b))
    assert modes(model) == before
    collect_gradients(model, targets, data, lambda m, b: m(b).square().mean())
    assert modes(model) == before


# ---------------------------------------------------------------------- inference mode
class SharedInput(nn.Module):
    """q/k/v projections reading one tensor, the case the shared-reduction cache serves."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.q(x) + self.k(x) + self.v(x)


def test_statistics_under_inference_mode_equal_the_normal_ones_and_are_normal_tensors():
    torch.manual_seed(0)
    model = SharedInput()
    targets = all_targets(model)
    data = [torch.randn(2, 3, 4) for _ in range(2)]
    normal = collect_input_norms(model, targets, data, forward=lambda m, b: m(b))
    with torch.inference_mode():
        inside = collect_input_norms(model, targets, data, forward=lambda m, b: m(b))
    for name, value in normal.sums.items():
        assert torch.equal(inside.sums[name], value), name
        assert not inside.sums[name].is_inference(), "the sums must be usable outside inference mode"


def test_a_model_and_inputs_made_under_inference_mode_calibrate():
    with torch.inference_mode():
        torch.manual_seed(0)
        model = SharedInput()
        data = [torch.randn(2, 3, 4) for _ in range(2)]
    assert model.q.weight.is_inference() and data[0].is_inference()
    stats = collect_input_norms(model, all_targets(model), data, forward=lambda m, b: m(b))
    expected = sum(x.pow(2).sum((0, 1)) for x in data)
    for name in ("q.weight", "k.weight", "v.weight"):
        assert torch.allclose(stats.sums[name].float(), expected), name


def test_multiflow_prune_runs_inside_inference_mode():
    torch.manual_seed(0)
    model = ToyVLM()
    common = dict(sparsity=0.5, calibration=make_batches(2), forward=forward_fn, modalities=GROUPS, exclude=["head"])
    outside = prune(model, **common)
    with torch.inference_mode():
        inside = prune(model, **common)
    assert all(torch.equal(inside.masks[n], outside.masks[n]) for n in outside.masks)


def test_gradients_inside_inference_mode_and_inference_parameters():
    torch.manual_seed(0)
    model = ToyVLM()
    targets = all_targets(model, GROUPS, exclude=["head"])
    outside = collect_gradients(model, targets, make_batches(2), loss_fn)
    with torch.inference_mode():
        data = make_batches(2)  # inference tensors: cloned before autograd sees them
        inside = collect_gradients(model, targets, data, loss_fn)
    for name, value in outside.sums.items():
        assert torch.allclose(inside.sums[name], value), name
    with torch.inference_mode():
        frozen = ToyVLM()
    with pytest.raises(ValueError, match=r"inference tensors \(first: \['vision.0.weight'"):
        collect_gradients(frozen, all_targets(frozen, GROUPS, exclude=["head"]), make_batches(1), loss_fn)


# ---------------------------------------------------------------------- failing forwards
def test_a_forward_that_raises_names_the_batch_the_call_and_the_batch_contents():
    torch.manual_seed(0)
    model = ToyVLM()
    targets = all_targets(model, GROUPS, exclude=["head"])
    data = make_batches(4)  # the default forward passes "label" too, which ToyVLM.forward does not take
    with pytest.raises(CalibrationError) as info:
        collect_input_norms(model, targets, data, shard=(1, 2))
    message = str(info.value)
    assert "during calibration, batch 1:" in message  # the global index of rank 1's first batch
    assert "`model(**batch)`" in message and "unexpected keyword argument 'label'" in message
    assert "'image': Tensor(4, 5, 12) float32" in message and "'label': Tensor(4,) int64" in message
    assert isinstance(info.value.__cause__, TypeError)
    assert isinstance(info.value, RuntimeError)


def test_a_tuple_batch_and_a_named_forward_are_described():
    model = ToyVLM()
    targets = all_targets(model, GROUPS, exclude=["head"])
    batch = make_batches(1)[0]
    pair = (batch["image"], batch["input_ids"])
    with pytest.raises(CalibrationError, match=r"`model\(batch\)`.*tuple of 2 \(Tensor\(4, 5, 12\) float32"):
        collect_input_norms(model, targets, [pair])

    def step(m, b):
        m(b["missing"])

    step.__qualname__ = "pl_module.calibration_step(batch)"
    with pytest.raises(CalibrationError, match=r"batch 0: the forward `pl_module.calibration_step\(batch\)` raised KeyError"):
        collect_input_norms(model, targets, [batch], forward=step)


def test_a_loss_that_raises_is_described_and_interrupts_are_not_wrapped():
    model = ToyVLM()
    targets = all_targets(model, GROUPS, exclude=["head"])

    def bad_loss(m, b):
        return m(**b)

    with pytest.raises(CalibrationError, match=r"batch 0: the loss `.*bad_loss` raised TypeError.*'label'"):
        collect_gradients(model, targets, make_batches(1), bad_loss)

    def interrupted(m, b):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect_input_norms(model, targets, make_batches(1), forward=interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect_gradients(model, targets, make_batches(1), interrupted)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------- DistributedSampler loaders
def samples(n: int) -> list[dict]:
    return [{"x": torch.full((3,), float(i))} for i in range(n)]


def presharded_loaders(n_samples: int, world: int, inside_batch_sampler: bool):
    for rank in range(world):
        sampler = DistributedSampler(samples(n_samples), num_replicas=world, rank=rank, shuffle=False)
        if inside_batch_sampler:
            yield rank, DataLoader(samples(n_samples), batch_sampler=BatchSampler(sampler, 2, drop_last=False))
        else:
            yield rank, DataLoader(samples(n_samples), batch_size=2, sampler=sampler)


@pytest.mark.parametrize("inside_batch_sampler", [False, True])
def test_a_distributed_sampler_loader_is_not_sharded_again(inside_batch_sampler):
    seen_indices, seen_values = [], []
    for rank, loader in presharded_loaders(12, 3, inside_batch_sampler):
        for index, batch in iterate_shard(loader, None, (rank, 3)):
            seen_indices.append(index)
            seen_values += batch["x"][:, 0].tolist()
    assert sorted(seen_indices) == list(range(6)), "every global batch exactly once"
    assert sorted(seen_values) == [float(i) for i in range(12)], "every sample exactly once"
    capped = [i for rank, loader in presharded_loaders(12, 3, inside_batch_sampler)
              for i, _ in iterate_shard(loader, 4, (rank, 3))]
    assert sorted(capped) == [0, 1, 2, 3], "num_batches caps the global count"


def test_distributed_sampler_statistics_over_the_ranks_equal_one_process():
    model = nn.Linear(3, 2)
    targets = all_targets(model)
    forward = lambda m, b: m(b["x"])  # noqa: E731
    single = collect_input_norms(model, targets, DataLoader(samples(8), batch_size=2), forward=forward)
    ranks = [collect_input_norms(model, targets, loader, forward=forward, shard=(rank, 2))
             for rank, loader in presharded_loaders(8, 2, False)]
    assert sum(r.num_batches for r in ranks) == single.num_batches == 4
    assert sum(r.num_samples for r in ranks) == single.num_samples == 8
    assert torch.allclose(sum(r.sums["weight"] for r in ranks), single.sums["weight"])


def test_a_distributed_sampler_of_another_rank_is_refused():
    sampler = DistributedSampler(samples(8), num_replicas=2, rank=1, shuffle=False)
    loader = DataLoader(samples(8), batch_size=2, sampler=sampler)
    with pytest.raises(ValueError, match=r"rank 1 of 2, but this process calibrates as shard \(0, 2\)"):
        list(iterate_shard(loader, None, (0, 2)))


# ---------------------------------------------------------------------- tied embeddings, shared names
class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def test_a_linear_tied_to_an_embedding_stays_dense_unless_asked():
    model = TiedLM()
    assert list(all_targets(model)) == ["body.weight"]
    opted_in = all_targets(model, prune_tied_embeddings=True)
    assert list(opted_in) == ["body.weight", "embed.weight"]
    assert opted_in["embed.weight"].modules == [model.head]
    result = prune(model, sparsity=0.5, method="omp")
    assert set(result.masks) == {"body.weight"}


def test_exclude_matches_any_name_of_a_shared_weight():
    model = TiedLM()
    # the canonical name is embed.weight; the head's own name must be enough to leave it dense
    assert list(all_targets(model, exclude=[r"^head\."], prune_tied_embeddings=True)) == ["body.weight"]
    lin = nn.Linear(4, 4)
    shared = nn.ModuleDict({"a": lin, "b": lin})
    with pytest.raises(ValueError, match="no prunable"):
        all_targets(shared, exclude=[r"^b\."])


# ---------------------------------------------------------------------- declared image groups
class ImageAndText(nn.Module):
    """Image tokens (B, P, D) whose leading dims equal the text mask's (B, L): only a declaration tells them apart."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(4, 4)
        self.text = nn.Linear(4, 4)

    def forward(self, patches, words):
        return self.image(patches).mean() + self.text(words).mean()


IMAGE_TEXT = {"image": r"^image\.", "text": r"^text\."}


def image_text_stats(**spec):
    model = ImageAndText()
    g = torch.Generator().manual_seed(0)
    batch = {"patches": torch.randn(2, 3, 4, generator=g), "words": torch.randn(2, 3, 4, generator=g),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])}
    targets = find_targets(model, resolve_modalities(model, IMAGE_TEXT, **spec))
    stats = collect_input_norms(model, targets, [batch], forward=lambda m, b: m(b["patches"], b["words"]))
    return batch, targets, stats


def test_a_declared_image_group_is_never_pad_filtered():
    batch, targets, stats = image_text_stats(image_groups=("image",))
    assert not targets["image.weight"].filter_tokens and targets["text.weight"].filter_tokens
    mask = batch["attention_mask"].bool()
    assert torch.allclose(stats.sums["image.weight"].float(), batch["patches"].pow(2).sum((0, 1)))
    assert torch.allclose(stats.sums["text.weight"].float(), batch["words"][mask].pow(2).sum(0))
    # undeclared, the equal (B, L) dims decide nothing: float inputs cannot be traced to token ids, so it asks
    with pytest.raises(ValueError, match=r"'image\.weight'.*cannot be known.*image_groups="):
        image_text_stats()


def test_a_group_named_vision_is_not_an_image_group_by_its_name_alone():
    model = ToyVLM()
    assert all(t.filter_tokens for t in all_targets(model, GROUPS, exclude=["head"]).values())
    declared = all_targets(model, GROUPS, exclude=["head"], image_groups="vision")
    assert {n for n, t in declared.items() if not t.filter_tokens} == {"vision.0.weight", "vision.2.weight"}


def test_unknown_image_groups_are_named():
    with pytest.raises(ValueError, match=r"image_groups: unknown group\(s\) \['vision'\]"):
        image_text_stats(image_groups=("vision",))
    model = ImageAndText()
    by_callable = resolve_modalities(model, lambda name: name.split(".")[0], image_groups=["image"])
    assert not find_targets(model, by_callable)["image.weight"].filter_tokens
    wrong = resolve_modalities(model, lambda name: name.split(".")[0], image_groups=["pixels"])
    with pytest.raises(ValueError, match=r"unknown group\(s\) \['pixels'\] \(callable\); groups: \['image', 'text'\]"):
        find_targets(model, wrong)
    with pytest.raises(ValueError, match=r"preset 'toy-bad-image': image_groups \['pixels'\]"):
        register_preset("toy-bad-image", IMAGE_TEXT, image_groups=("pixels",))


def test_presets_declare_their_image_groups_and_a_caller_can_override_them():
    register_preset("toy-image-text", IMAGE_TEXT, image_groups=("image",))
    model = ImageAndText()
    assert not all_targets(model, "toy-image-text")["image.weight"].filter_tokens
    assert all_targets(model, "toy-image-text", image_groups=())["image.weight"].filter_tokens
    from mflightning.pruning import get_preset

    assert get_preset("blip").image_groups == ("vision",) and get_preset("xvlm").image_groups == ("vision",)
