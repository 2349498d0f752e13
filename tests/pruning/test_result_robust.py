"""PruningResult edge cases: partial mask files, ambiguous name prefixes, atomic saves, IterSNIP re-thresholds."""
import os

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from mflightning import PruningResult, prune
from mflightning.pruning import register_preset
from toy_models import GROUPS, ToyVLM, make_batches, model_inputs


def bert(layers: int) -> BertModel:
    """A tiny BERT (6 nn.Linear per layer, plus the pooler)."""
    torch.manual_seed(layers)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    return BertModel(config)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ToyVLM()


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(**model_inputs(batch)), batch["label"])


# ---------------------------------------------------------------------- coverage
def test_a_two_layer_file_on_a_six_layer_model_names_the_uncovered_layers(tmp_path):
    path = prune(bert(2), sparsity=0.5, method="omp").save(tmp_path / "bert2.safetensors")
    result = PruningResult.load(path)
    six = bert(6)
    # 6 layers x 6 Linear + pooler = 37 prunable; the file covers layers 0-1 and the pooler (13)
    with pytest.raises(ValueError, match=r"bert2\.safetensors.*24 of its 37 prunable layers get no mask "
                                         r"\(\['encoder\.layer\.2\.attention\.self\.query\.weight'.*and 19 more\)"):
        result.apply(six)
    linears = [m.weight for m in six.modules() if isinstance(m, nn.Linear)]
    assert all((w != 0).all() for w in linears), "a refused file must not zero anything"
    assert len(result.masks_for(six, partial=True)) == 13
    # layers kept dense on purpose are not asked for
    kept_dense = result.masks_for(six, exclude=[r"^encoder\.layer\.[2-5]\."])
    assert set(kept_dense) == set(result.masks)


def test_layers_filled_by_inherit_rules_count_as_covered_and_only_the_rest_is_named():
    register_preset("robust-copy", {"all": r"."}, inherit=((r"^copy\.", "orig."),))
    source = nn.Module()
    source.orig = nn.Linear(6, 6)
    result = prune(source, sparsity=0.5, method="omp", modalities="robust-copy")
    task = nn.Module()
    task.orig, task.copy = nn.Linear(6, 6), nn.Linear(6, 6)
    task.pruning_preset = "robust-copy"
    assert set(result.masks_for(task)) == {"orig.weight", "copy.weight"}
    task.extra = nn.Linear(6, 6)  # no mask, no inherit rule
    with pytest.raises(ValueError, match=r"1 of its 3 prunable layers get no mask \(\['extra\.weight'\]\)"):
        result.masks_for(task)


def test_the_runs_own_exclusions_travel_with_the_file_even_anchored_under_a_prefix(model, tmp_path):
    result = prune(model, sparsity=0.5, method="omp", modalities=GROUPS, exclude=[r"^head\."])
    loaded = PruningResult.load(result.save(tmp_path / "m.safetensors"))
    assert loaded.exclude == (r"^head\.",) and loaded.dense_layers == {"head.weight": 32}
    wrapper = nn.Module()
    wrapper.model = model  # `^head\.` matches the mask-side name of model.head.weight
    assert set(loaded.masks_for(wrapper)) == {f"model.{n}" for n in result.masks}
    forgotten = PruningResult(**{**loaded.__dict__, "exclude": ()})
    with pytest.raises(ValueError, match=r"\['model\.head\.weight'\]"):
        forgotten.masks_for(wrapper)


def test_figures_say_what_they_count(model, tmp_path):
    result = prune(model, sparsity=0.5, method="omp", modalities=GROUPS, exclude=[r"^head\."])
    weights = sum(m.numel() for m in result.masks.values())
    assert (result.num_layers, result.num_weights) == (5, weights)
    expected = f"over 5 masked layers / {weights:,d} weights; 1 prunable layer(s) / 32 weights left dense"
    assert expected in result.summary()
    report = result.report()
    assert report.splitlines()[0] == result.summary()
    assert "not counted: head.weight" in report
    everything = prune(model, sparsity=0.5, method="omp")
    assert "(every prunable layer of the pruned model)" in everything.summary()
    unknown = PruningResult(result.masks, result.groups, "omp", 0.5, "global")
    assert "layers left dense were not recorded" in unknown.summary()
    loaded = PruningResult.load(result.save(tmp_path / "m.safetensors"))
    assert loaded.summary() == result.summary()


# ---------------------------------------------------------------------- name prefixes
class Distill(nn.Module):
    """Two copies of the backbone: the masks of a bare ToyVLM fit either."""

    def __init__(self):
        super().__init__()
        self.teacher, self.student = ToyVLM(), ToyVLM()


def test_two_copies_of_the_backbone_are_an_error_naming_both_prefixes(model):
    result = prune(model, sparsity=0.5, method="omp", modalities=GROUPS, exclude=[r"head\."])
    distill = Distill()
    with pytest.raises(ValueError, match=r"2 different name prefixes \('(teacher|student)\.', '(teacher|student)\.'\)"
                                         r".*prefix="):
        result.masks_for(distill)
    student = result.masks_for(distill, prefix="student.", exclude=[r"^teacher\."])
    assert set(student) == {f"student.{n}" for n in result.masks}
    resolved = result.apply(distill, prefix="teacher.", exclude=[r"^student\."])
    assert torch.equal(distill.teacher.text.fc1.weight != 0, resolved["teacher.text.fc1.weight"])
    assert (distill.student.text.fc1.weight != 0).all()
    with pytest.raises(ValueError, match=r"with prefix 'pupil\.' are not parameters"):
        result.masks_for(distill, prefix="pupil.")


def test_an_explicit_empty_prefix_means_the_exact_names(model):
    result = prune(model, sparsity=0.5, method="omp", modalities=GROUPS, exclude=[r"head\."])
    assert set(result.masks_for(model, prefix="")) == set(result.masks)
    wrapper = nn.Module()
    wrapper.model = model
    with pytest.raises(ValueError, match="with prefix|are not parameters"):
        result.masks_for(wrapper, prefix="")


# ---------------------------------------------------------------------- atomic save
def test_an_interrupted_save_leaves_the_good_file_and_no_temporary(model, tmp_path, monkeypatch):
    import safetensors.torch

    result = prune(model, sparsity=0.5, method="omp", modalities=GROUPS, exclude=[r"head\."])
    path = result.save(tmp_path / "masks.safetensors")
    good = path.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(good[: len(good) // 3])  # partial data, then the write dies
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(OSError, match="disk full"):
        result.at(0.8).save(path)
    assert path.read_bytes() == good
    with pytest.raises(OSError, match="disk full"):
        result.save(tmp_path / "new.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["masks.safetensors"]
    monkeypatch.undo()
    assert PruningResult.load(path).masks.keys() == result.masks.keys()


# ---------------------------------------------------------------------- re-threshold
def test_itersnip_refuses_another_sparsity_but_reproduces_its_own(model):
    result = prune(model, sparsity=0.9, method="itersnip", calibration=make_batches(4), loss=loss_fn,
                   modalities=GROUPS, exclude=[r"head\."], rounds=3)
    with pytest.raises(ValueError, match=r"re-run prune\(method='itersnip', sparsity=0\.5\)"):
        result.at(0.5)
    same = result.at(0.9)
    assert all(torch.equal(same.masks[n], result.masks[n]) for n in result.masks)


def test_the_cli_rethresholds_scores_files_and_names_the_setting_for_itersnip(model, tmp_path):
    from mflightning.cli import PruningSettings, RecipeError

    common = dict(calibration=make_batches(4), forward=lambda m, b: m(**model_inputs(b)), modalities=GROUPS,
                  exclude=[r"head\."])
    scores = prune(model, sparsity=0.5, **common).save(tmp_path / "scores.safetensors", include_scores=True)
    assert PruningSettings(sparsity=0.7, masks=str(scores)).load_masks().sparsity == pytest.approx(0.7, abs=0.01)
    itersnip = prune(model, sparsity=0.5, method="itersnip", loss=loss_fn, rounds=2, **common)
    path = itersnip.save(tmp_path / "itersnip.safetensors", include_scores=True)
    with pytest.raises(RecipeError, match=r"pruning.sparsity=0.7 with mask file .*itersnip.safetensors.*re-run"):
        PruningSettings(sparsity=0.7, masks=str(path)).load_masks()
    assert PruningSettings(sparsity=0.5, masks=str(path)).load_masks().target_sparsity == 0.5


def test_masks_for_layers_the_model_lacks_are_named_not_called_a_prefix_mismatch(model):
    """A file with a mask for a layer the module lacks (the rest fitting under 'model.') names that
    layer and the prefix that fits, with or without partial=True; a file covering part of the module
    applies with partial=True."""
    from dataclasses import replace

    result = prune(model, sparsity=0.5, method="omp", modalities=GROUPS, exclude=[r"head\."])
    module = nn.Module()
    module.model = ToyVLM()
    extra = replace(result, masks={"adapter.weight": torch.ones(2, 2, dtype=torch.bool), **result.masks},
                    groups={"adapter.weight": "text", **result.groups})
    for partial in (False, True):
        with pytest.raises(ValueError, match=r"name 1 layer\(s\) the model lacks \(first: \['adapter.weight'\]\); "
                                             r"the other 5 of 6 match its parameters under 'model\.'.*partial_masks"):
            extra.masks_for(module, partial=partial)
    text_only = {n: m for n, m in result.masks.items() if n.startswith("text.")}
    part = replace(result, masks=text_only, groups={n: result.groups[n] for n in text_only})
    assert set(part.masks_for(module, partial=True)) == {"model." + n for n in text_only}
    with pytest.raises(ValueError, match="vision"):  # without partial=True the uncovered layers are named
        part.masks_for(module)


def test_a_partial_file_is_not_called_ambiguous_when_one_prefix_keeps_its_names():
    """A file covering only the encoder of a backbone held as `backbone.`: its names also fit the decoder
    with `enc.` replaced by `dec.bert.`, an accident of coverage; the mapping that only adds the prefix wins.
    Two copies under equal prefixes stay an error."""
    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.Module(), nn.Module()
            self.enc.layer, self.dec.bert = nn.Linear(4, 4), nn.Module()
            self.dec.bert.layer = nn.Linear(4, 4)

    backbone = Backbone()
    result = prune(backbone, sparsity=0.5, method="omp", modalities={"text": r"^enc\."}, exclude=[r"^dec\."])
    assert set(result.masks) == {"enc.layer.weight"}
    holder = nn.Module()
    holder.backbone = Backbone()
    assert set(result.masks_for(holder, partial=True)) == {"backbone.enc.layer.weight"}
    twins = nn.Module()
    twins.a, twins.b = Backbone(), Backbone()
    with pytest.raises(ValueError, match="2 different name prefixes"):
        result.masks_for(twins, partial=True)
