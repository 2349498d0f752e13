"""N:M patterns: every method, exact counts, errors, files, and the pattern kept through fine-tuning."""
import pytest
import torch
from torch.utils.data import DataLoader

from mflightning import MultiFlowCallback, PruningConfig, PruningResult, prune
from mflightning.pruning import pattern_violations
from mflightning.pruning.allocation import pattern_masks
from toy_models import GROUPS, ToyModule, ToyVLM, make_batches
from toy_models import quiet_trainer as trainer

COMMON = dict(modalities=GROUPS, exclude=[r"head\."])


def forward(model, batch):
    model(batch["image"], batch["input_ids"], batch["attention_mask"])


def loss(model, batch):
    return model(batch["image"], batch["input_ids"], batch["attention_mask"]).square().mean()


def kept_per_group(mask, m):
    return mask.reshape(mask.shape[0], -1, m).sum(-1)


@pytest.mark.parametrize("method", ["multiflow", "omp", "lamp", "random", "wanda", "snip", "itersnip"])
def test_every_method_keeps_exactly_n_of_every_m(method):
    torch.manual_seed(0)
    result = prune(ToyVLM(), pattern="2:4", method=method, calibration=make_batches(3), forward=forward,
                   loss=loss, rounds=2, **COMMON)
    assert result.pattern == "2:4" and result.target_sparsity == 0.5
    for name, mask in result.masks.items():
        assert (kept_per_group(mask, 4) == 2).all(), name
    assert pattern_violations(result.masks, "2:4") == {}
    assert result.sparsity == 0.5


def test_the_kept_weights_are_the_top_n_scores_of_each_run():
    scores = {"w": torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]])}
    assert pattern_masks(scores, "2:4")["w"].tolist() == [[True, False, True, False, False, True, True, False]]
    assert pattern_masks(scores, "1:4")["w"].tolist() == [[True, False, False, False, False, True, False, False]]
    # MultiFlow under 2:4 ranks by its own score: the same as selecting on the unstructured scores
    torch.manual_seed(1)
    model = ToyVLM()
    scored = prune(model, sparsity=0.5, calibration=make_batches(2), forward=forward, **COMMON)
    patterned = prune(model, pattern="2:4", calibration=make_batches(2), forward=forward, **COMMON)
    for name, s in scored.scores.items():
        assert torch.equal(patterned.masks[name], pattern_masks({name: s}, "2:4")[name])


def test_bad_patterns_and_incompatible_widths_are_named():
    for bad in ("2:2", "3:2", "0:4", "a:b", "2.5:4", "2-4", 4):
        with pytest.raises(ValueError, match="pattern"):
            PruningConfig(pattern=bad)
    with pytest.raises(ValueError, match="prunes exactly 0.5 of each layer, but sparsity=0.75"):
        PruningConfig(pattern="2:4", sparsity=0.75)
    torch.manual_seed(0)
    model = ToyVLM()  # vision.0 reads 12 features: not a multiple of 8
    with pytest.raises(ValueError, match=r"not a multiple of 8 \(vision\.0\.weight \(16, 12\)\)"):
        prune(model, pattern="4:8", method="omp", **COMMON)
    result = prune(model, pattern="4:8", method="omp", dense_if_incompatible=True, **COMMON)
    assert result.masks["vision.0.weight"].all()
    assert (kept_per_group(result.masks["text.fc1.weight"], 8) == 4).all()
    assert pattern_violations(result.masks, "4:8") == {"vision.0.weight": 16}


def test_pattern_violations_count_runs_keeping_too_many():
    mask = torch.tensor([[True, True, True, False, True, False, False, False]])
    assert pattern_violations({"w": mask}, "2:4") == {"w": 1}
    assert pattern_violations({"w": mask}, "3:4") == {}


def test_a_pattern_result_saves_reports_and_rethresholds_by_pattern_only(tmp_path):
    torch.manual_seed(0)
    result = prune(ToyVLM(), pattern="2:4", method="omp", **COMMON)
    loaded = PruningResult.load(result.save(tmp_path / "m.safetensors", include_scores=True))
    assert loaded.pattern == "2:4"
    assert "pattern=2:4" in loaded.report().splitlines()[0]
    with pytest.raises(ValueError, match="follow the N:M pattern '2:4'"):
        loaded.at(0.7)
    other = loaded.at(pattern="1:4")
    assert other.pattern == "1:4" and other.target_sparsity == 0.75
    assert all((kept_per_group(m, 4) == 1).all() for m in other.masks.values())


def test_fine_tuning_keeps_the_pattern_exact(tmp_path):
    module = ToyModule()
    callback = MultiFlowCallback(pattern="2:4", calibration=make_batches(2), **COMMON)
    trainer(tmp_path, max_steps=6, callbacks=[callback]).fit(module, DataLoader(make_batches(6), batch_size=None))
    params = dict(module.named_parameters())
    nonzero = {name: params[name].detach() != 0 for name in callback.kept_masks}
    assert pattern_violations(nonzero, "2:4") == {}
    assert all((kept_per_group(callback.kept_masks[n], 4) == 2).all() for n in nonzero)
