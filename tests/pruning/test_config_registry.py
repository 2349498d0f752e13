"""One pruning configuration, one method registry, and an engine that stands on its own."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from mflightning import MultiFlowCallback, PruningConfig, prune
from mflightning.pruning import METHODS, get_method, register_method
from mflightning.pruning.presets import register_preset
from toy_models import GROUPS, ToyVLM, make_batches


def test_the_config_is_validated_once_naming_the_field():
    with pytest.raises(ValueError, match="sparsity must be in"):
        PruningConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="unknown pruning method 'nope'"):
        PruningConfig(method="nope")
    with pytest.raises(ValueError, match="unknown allocation 'sideways'"):
        PruningConfig(allocation="sideways")
    for bad in (0, 2.5, "2", True, float("nan")):  # refused at once, not late with an unrelated message
        with pytest.raises(ValueError, match=f"rounds must be a whole number >= 1, got {bad!r}"):
            PruningConfig(rounds=bad)
        with pytest.raises(ValueError, match=f"num_batches must be a whole number >= 1, got {bad!r}"):
            MultiFlowCallback(0.5, num_batches=bad)
    assert PruningConfig(num_batches=np.int64(2), rounds=3.0).num_batches == 2
    assert type(PruningConfig(num_batches=np.int64(2), rounds=3.0).rounds) is int
    with pytest.raises(TypeError, match="unknown pruning setting\\(s\\) \\['sparsty'\\]"):
        PruningConfig.build(sparsty=0.5)
    config = PruningConfig(sparsity=np.float32(0.5), exclude="head", image_groups="vision")
    assert config.sparsity == 0.5 and config.exclude == ("head",) and config.image_groups == ("vision",)
    assert PruningConfig(method="wanda").effective_allocation == "row"


def test_prune_and_the_callback_read_the_same_config():
    forward = lambda m, b: m(b["image"], b["input_ids"], b["attention_mask"])  # noqa: E731
    config = PruningConfig(sparsity=0.6, method="wanda", modalities=GROUPS, exclude=(r"head\.",))
    torch.manual_seed(0)
    model = ToyVLM()
    by_config = prune(model, config, calibration=make_batches(2), forward=forward)
    by_keywords = prune(model, calibration=make_batches(2), forward=forward, **config.to_dict())
    overridden = prune(model, config, calibration=make_batches(2), forward=forward, sparsity=0.3)
    assert all(torch.equal(by_config.masks[n], by_keywords.masks[n]) for n in by_config.masks)
    assert by_config.allocation == "row" and overridden.target_sparsity == 0.3
    callback = MultiFlowCallback(config=config, num_batches=3)
    assert callback.config.method == "wanda" and callback.config.num_batches == 3 and callback.sparsity == 0.6


def test_every_method_is_one_registry_entry_and_names_register_once():
    assert set(METHODS) >= {"multiflow", "omp", "lamp", "random", "wanda", "snip", "itersnip"}
    assert get_method("multiflow").needs == "activations" and get_method("itersnip").iterative
    with pytest.raises(ValueError, match="'omp' is already registered"):
        register_method("omp", needs=None, allocation="global", description="again")(lambda w: w.abs())
    with pytest.raises(ValueError, match="unknown allocation"):
        register_method("bad", needs=None, allocation="diagonal", description="")


def test_a_registered_method_is_usable_by_name():
    name = "test-negative-magnitude"
    if name not in METHODS:
        register_method(name, needs=None, allocation="layer", description="keeps the smallest weights")(
            lambda weight: -weight.detach().abs().float()
        )
    torch.manual_seed(0)
    model = ToyVLM()
    result = prune(model, sparsity=0.5, method=name, modalities=GROUPS, exclude=[r"head\."])
    weight = model.vision[0].weight.detach().abs()
    kept = result.masks["vision.0.weight"]
    assert weight[kept].max() <= weight[~kept].min()  # the largest half was pruned


def test_a_preset_name_cannot_be_taken_by_another_definition():
    register_preset("test-twice", {"all": "."})
    register_preset("test-twice", {"all": "."})  # the same definition again (a re-import) is fine
    with pytest.raises(ValueError, match="'test-twice' is already registered with another definition"):
        register_preset("test-twice", {"all": r"\."})


def test_the_engine_imports_nothing_from_the_rest_of_the_package():
    code = (
        "import sys, mflightning.pruning\n"
        "bad = sorted(m for m in sys.modules if m.startswith('mflightning') and not m.startswith('mflightning.pruning')"
        " and m != 'mflightning' or m.startswith('lightning'))\n"
        "print(bad)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
