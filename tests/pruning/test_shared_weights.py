"""Statistics of weights shared by several modules (BLIP's tied pretraining layout) against a hand reference.

The MULTIFLOW code takes a shared weight's statistic from the module under its first name (the
image-grounded encoder); the decoder pass feeds only the decoder's own layers. One module called
several times still accumulates all its calls.
"""
import pytest
import torch

from mflightning import PruningConfig, prune
from mflightning.models.blip import BlipBackbone, tiny_config
from mflightning.models.interface import with_first_token
from mflightning.pruning.stats import collect_input_norms
from mflightning.pruning.targets import find_targets, resolve_modalities

VOCAB = 40
ENC = "text_encoder.encoder.layer.0."
DEC = "text_decoder.bert.encoder.layer.0."


def tied_blip():
    torch.manual_seed(0)
    return BlipBackbone(tiny_config(VOCAB), tie_decoder=True).eval()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 38, (3, 7), generator=g)
    att = torch.ones(3, 7, dtype=torch.long)
    att[1, 4:] = 0
    att[2, 5:] = 0
    return {"image": torch.randn(3, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": att}


def calibration_forward(model, b):
    """BLIP's calibration forward plus a second (unimodal) encoder call: the encoder runs twice."""
    model(**b)
    model.encode_text(with_first_token(b["input_ids"], model.enc_token_id), b["attention_mask"])


def hand_reference(model, batches, module_names):
    """Per module: sum over the non-padding tokens of its inputs squared, recorded with plain torch hooks."""
    modules = dict(model.named_modules(remove_duplicate=False))
    sums = {name: 0.0 for name in module_names}
    calls = dict.fromkeys(module_names, 0)
    current = {}

    def recorder(name):
        def hook(module, args):
            x = args[0].float()  # squared in fp32, summed in fp64 (as the engine)
            mask = current["mask"]
            rows = x[mask] if x.shape[:2] == mask.shape else x.reshape(-1, x.shape[-1])
            sums[name] = sums[name] + rows.pow(2).sum(0).double()
            calls[name] += 1
        return hook

    handles = [modules[n].register_forward_pre_hook(recorder(n)) for n in module_names]
    with torch.no_grad():
        for b in batches:
            current["mask"] = b["attention_mask"].bool()
            calibration_forward(model, b)
    for h in handles:
        h.remove()
    return sums, calls


def test_tied_blip_statistics_come_from_the_module_under_the_first_name():
    model = tied_blip()
    shared = ["crossattention.self.query", "crossattention.self.key", "intermediate.dense", "output.dense"]
    for part in shared:  # the decoder applies the encoder's weights through its own modules
        dec, enc = model.get_submodule(DEC + part), model.get_submodule(ENC + part)
        assert dec is not enc and dec.weight is enc.weight
    own = "attention.self.query"  # the decoder's causal self-attention: its own weights
    batches = [batch(0), batch(1)]
    names = [p + s for s in shared + [own] for p in (ENC, DEC)]
    reference, calls = hand_reference(model, batches, names)
    targets = find_targets(model, resolve_modalities(model, None))
    stats = collect_input_norms(model, targets, batches, forward=calibration_forward)
    for part in shared:
        got = stats.sums[ENC + part + ".weight"]
        torch.testing.assert_close(got, reference[ENC + part], rtol=1e-6, atol=0)
        # the decoder's calls did feed values into the shared weight: leaving them out is a real difference
        assert not torch.allclose(got, reference[ENC + part] + reference[DEC + part], rtol=1e-3)
        assert stats.calls[ENC + part + ".weight"] == calls[ENC + part]
    torch.testing.assert_close(stats.sums[DEC + own + ".weight"], reference[DEC + own], rtol=1e-6, atol=0)
    # one module called twice per batch (grounded and unimodal encoder) accumulates both calls
    torch.testing.assert_close(stats.sums[ENC + own + ".weight"], reference[ENC + own], rtol=1e-6, atol=0)
    assert stats.calls[ENC + own + ".weight"] == 2 * len(batches)

    every = find_targets(model, resolve_modalities(model, None), shared_weight_inputs="every_module")
    all_calls = collect_input_norms(model, every, batches, forward=calibration_forward)
    for part in shared:
        torch.testing.assert_close(
            all_calls.sums[ENC + part + ".weight"], reference[ENC + part] + reference[DEC + part], rtol=1e-6, atol=0
        )
        assert all_calls.calls[ENC + part + ".weight"] == calls[ENC + part] + calls[DEC + part]


def test_the_option_reaches_prune_and_changes_tied_blip_masks():
    model = tied_blip()
    batches = [batch(0), batch(1)]
    first = prune(model, sparsity=0.6, calibration=batches)
    every = prune(model, sparsity=0.6, calibration=batches, shared_weight_inputs="every_module")
    assert PruningConfig().shared_weight_inputs == "first_module"
    name = ENC + "intermediate.dense.weight"
    assert not torch.equal(first.masks[name], every.masks[name])
    own = "vision_model.encoder.layers.0.mlp.fc1.weight"  # no shared weight: the same statistic
    assert torch.equal(first.masks[own], every.masks[own])
    with pytest.raises(ValueError, match="shared_weight_inputs"):
        PruningConfig(sparsity=0.5, shared_weight_inputs="decoder")
