"""prune() edge cases: sparsity types, IterSNIP batch use, inference mode, nearly empty layers."""
import fractions
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from mflightning import prune
from mflightning.pruning import check_sparsity
from toy_models import GROUPS, ToyVLM, make_batches, model_inputs

COMMON = dict(modalities=GROUPS, exclude=[r"head\."])


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ToyVLM()


def forward_fn(model, batch):
    return model(**model_inputs(batch))


class CountingLoss:
    """The pretraining-style loss of the toy model, counting the batches it sees."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        return nn.functional.cross_entropy(model(**model_inputs(batch)), batch["label"])


# ---------------------------------------------------------------------- sparsity values
def assert_refused(value):
    with pytest.raises(ValueError, match="sparsity must be") as caught:
        check_sparsity(value)
    assert repr(value) in str(caught.value)


def test_numpy_scalars_and_fractions_are_sparsities_but_bools_nan_and_strings_are_not():
    for value, expected in ((np.float32(0.5), 0.5), (np.float64(0.25), 0.25), (np.int64(0), 0.0),
                            (np.array(0.5), 0.5), (np.array([[0.75]]), 0.75), (fractions.Fraction(1, 2), 0.5)):
        result = check_sparsity(value)
        assert type(result) is float and result == expected, repr(value)
    for value in (np.bool_(False), True, np.float32("nan"), float("nan"), math.inf, np.float32(1.0), 1.0, -0.1,
                  "0.5", None, [0.5], np.array([0.1, 0.2])):
        assert_refused(value)


def test_one_element_tensors_are_sparsities_but_bool_complex_and_longer_tensors_are_not():
    for value in (torch.tensor(0.5), torch.tensor([0.75]), torch.tensor(0, dtype=torch.int32),
                  torch.tensor(0.5, dtype=torch.bfloat16)):
        result = check_sparsity(value)
        assert type(result) is float and result == value.item(), repr(value)
    for value in (torch.tensor(True), torch.tensor(float("inf")), torch.tensor(1.5), torch.tensor([0.1, 0.2]),
                  torch.tensor([]), torch.tensor(0.5 + 0j)):
        assert_refused(value)
    assert prune(ToyVLM(), sparsity=torch.tensor(0.5), method="omp").target_sparsity == 0.5


# ---------------------------------------------------------------------- IterSNIP batches
class Stream(IterableDataset):
    """An iterable dataset without a length, counting how often it is walked."""

    def __init__(self, batches):
        self.batches = batches
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def itersnip(model, calibration, rounds=3, **options):
    loss = CountingLoss()
    result = prune(model, sparsity=0.6, method="itersnip", calibration=calibration, loss=loss, rounds=rounds,
                   **COMMON, **options)
    return result, loss.calls


@pytest.mark.parametrize("kind", ["list", "generator", "iterable_dataset"])
def test_itersnip_uses_every_batch_once_whatever_the_data(model, kind):
    batches = make_batches(7)
    data = {
        "list": lambda: batches,
        "generator": lambda: (b for b in batches),
        "iterable_dataset": lambda: DataLoader(Stream(batches), batch_size=None),
    }[kind]()
    result, calls = itersnip(model, data)
    assert calls == 7 and result.calibration == {"num_batches": 7, "rounds": 3}


@pytest.mark.parametrize("kind", ["list", "generator", "iterable_dataset"])
def test_itersnip_respects_num_batches(model, kind):
    batches = make_batches(7)
    data = {"list": batches, "generator": (b for b in batches),
            "iterable_dataset": DataLoader(Stream(batches), batch_size=None)}[kind]
    result, calls = itersnip(model, data, num_batches=5)
    assert calls == 5 and result.calibration["num_batches"] == 5


def test_itersnip_counts_an_unsized_loader_with_one_extra_pass(model):
    stream = Stream(make_batches(6))
    result, calls = itersnip(model, DataLoader(stream, batch_size=None), rounds=2)
    assert calls == 6 and stream.passes == 2  # one pass to count, one consumed over the rounds


# ---------------------------------------------------------------------- inference mode
@pytest.mark.parametrize("method", ["multiflow", "wanda", "omp", "snip"])
def test_prune_under_inference_mode_returns_ordinary_masks(model, method):
    batches = make_batches(2)
    with torch.inference_mode():
        result = prune(model, sparsity=0.5, method=method, calibration=batches, forward=forward_fn,
                       loss=CountingLoss(), **COMMON)
    assert not any(m.is_inference() for m in result.masks.values())
    assert not any(s.is_inference() for s in result.scores.values())
    result.apply(model)
    weight = model.text.fc1.weight
    # fine-tuning multiplies by the mask under autograd, which cannot save an inference tensor
    (weight * result.masks["text.fc1.weight"]).sum().backward()
    assert torch.equal(weight.grad != 0, result.masks["text.fc1.weight"])


def test_batches_made_under_inference_mode_calibrate_every_method(model):
    with torch.inference_mode():
        batches = make_batches(2)
    for method in ("multiflow", "snip"):
        result = prune(model, sparsity=0.5, method=method, calibration=batches, forward=forward_fn,
                       loss=CountingLoss(), **COMMON)
        assert result.sparsity == pytest.approx(0.5, abs=0.01), method


def test_a_model_built_under_inference_mode_prunes_by_activations_but_not_by_gradients():
    torch.manual_seed(0)
    with torch.inference_mode():
        frozen = ToyVLM()
    assert frozen.text.fc1.weight.is_inference()
    with pytest.raises(RuntimeError, match=r"method 'snip' needs gradients.*inference tensors.*text\.fc1\.weight"):
        prune(frozen, sparsity=0.5, method="snip", calibration=make_batches(1), loss=CountingLoss(), **COMMON)
    # which inputs are text is traced with autograd, which cannot save inference weights: declare the image groups
    with pytest.raises(ValueError, match=r"could not be traced with gradients on.*inference tensor.*image_groups="):
        prune(frozen, sparsity=0.5, calibration=make_batches(2), forward=forward_fn, **COMMON)
    result = prune(frozen, sparsity=0.5, calibration=make_batches(2), forward=forward_fn, image_groups=["vision"], **COMMON)
    result.apply(frozen)  # in-place zeroing of inference tensors happens inside inference mode
    assert torch.equal(frozen.text.fc1.weight != 0, result.masks["text.fc1.weight"])


# ---------------------------------------------------------------------- nearly empty layers
def test_a_layer_left_almost_fully_pruned_is_named_in_a_warning(model):
    with torch.no_grad():
        model.head.weight.mul_(1e-4)  # like a freshly initialised head next to pretrained layers
    with pytest.warns(UserWarning, match=r"1 layer\(s\) left more than 99% pruned.*head\.weight \(100\.00%\).*exclude"):
        prune(model, sparsity=0.5, method="omp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune(model, sparsity=0.5, method="omp", exclude=[r"^head\."])
        prune(model, sparsity=0.995, method="omp")  # a target that high is no accident


def test_the_warning_lists_the_first_few_and_counts_the_rest():
    torch.manual_seed(0)
    tiny = nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)], nn.Linear(64, 64))
    with torch.no_grad():
        for layer in tiny[:8]:
            layer.weight.mul_(1e-4)
    with pytest.warns(UserWarning, match=r"8 layer\(s\).*0\.weight.*4\.weight \(100\.00%\) and 3 more"):
        prune(tiny, sparsity=0.5, method="omp")
