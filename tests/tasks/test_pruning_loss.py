"""SNIP's pruning loss: the MULTIFLOW code's terms per backbone, and paired (CC3M + VG) calibration batches."""
import pytest
import torch
from task_fixtures import BLIP, BOTH, XVLM, calibration_batch, make_tokenizer

from mflightning.tasks.base import split_segments


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("vocab"))


def seeded(fn, *args, seed=0):
    torch.manual_seed(seed)  # MLM masking and ITM hard negatives draw from torch's generator
    return fn(*args)


@pytest.mark.parametrize("family, task", [(BLIP, "retrieval"), (XVLM, "retrieval"), (XVLM, "vqa")])
def test_pruning_loss_is_the_authors_terms(tokenizer, family, task):
    module = family.module(task, tokenizer).eval()  # VQA: the XVLM backbone holds a decoder
    batch = calibration_batch(tokenizer, n=4, seed=1)
    losses = seeded(module.pretraining_losses, batch)
    expected = ("itc", "itm", "lm") if family is BLIP else ("itc", "itm", "mlm")
    if family is not BLIP:  # the captioning LM term is left out, as in the authors' SNIP
        assert losses["caption_lm"] > 0
        if task == "vqa":  # a decoder (absent from the authors' XVLM) gets its gradient from its own LM term
            expected += ("lm",)
    assert module.backbone.pruning_loss_terms == expected
    loss = seeded(module.pruning_loss, batch)
    torch.testing.assert_close(loss, sum(losses[t] for t in expected))


@pytest.mark.parametrize("family", BOTH)
def test_a_paired_batch_loss_is_the_mean_of_its_parts(tokenizer, family):
    module = family.module("retrieval", tokenizer).eval()
    first, second = calibration_batch(tokenizer, n=4, seed=2), calibration_batch(tokenizer, n=3, seed=3)
    paired = {k: torch.cat([first[k], second[k]]) for k in first} | {"segments": [4, 3]}
    parts = split_segments(paired)
    assert [p["input_ids"].shape[0] for p in parts] == [4, 3] and "segments" not in parts[0]
    assert torch.equal(parts[1]["image"], second["image"])
    torch.manual_seed(0)
    one, two = module.pruning_loss(first), module.pruning_loss(second)
    torch.testing.assert_close(seeded(module.pruning_loss, paired), (one + two) / 2)
    # in-batch negatives stay within each part: the concatenation without segments is another loss
    assert not torch.allclose(seeded(module.pruning_loss, {k: v for k, v in paired.items() if k != "segments"}),
                              (one + two) / 2)
    with pytest.raises(ValueError, match=r"\[4, 4\] does not split its 7 rows"):
        split_segments({**paired, "segments": [4, 4]})
