"""Calibration batches as the MULTIFLOW code builds them: one batch of each source (CC3M, VG) per step,
BLIP texts `[CLS] ... [SEP]` padded to 30, XVLM texts `[CLS]` + up to 39 tokens without `[SEP]`, padded to 40."""

import json

import pytest
import torch

from mflightning import prune
from mflightning.data import CalibrationDataModule, build_tokenizer
from mflightning.data.datasets import tokenize


@pytest.fixture(scope="module")
def two_sources(tiny_world, tmp_path_factory):
    """The world's 8 calibration records split into a 'cc3m' file (5) and a 'vg' file (3)."""
    records = json.loads(open(tiny_world.calibration).read())
    folder = tmp_path_factory.mktemp("sources")
    cc3m, vg = folder / "cc3m.json", folder / "vg.json"
    cc3m.write_text(json.dumps(records[:5]))
    vg.write_text(json.dumps(records[5:]))
    return [str(cc3m), str(vg)], records


def datamodule(world, files, **kw):
    return CalibrationDataModule(files, world.image_root, tokenizer=world.vocab, image_size=32, batch_size=2,
                                 num_workers=0, augment=False, pair_sources=True, **kw)


def texts(tokenizer, ids):
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]


def test_each_step_pairs_one_batch_of_every_source(tiny_world, two_sources):
    files, records = two_sources
    dm = datamodule(tiny_world, files)
    steps = list(dm.calibration_dataloader())
    # as many steps as the shortest source has batches (3 VG records in batches of 2: 2 steps, the last partial)
    assert [b["segments"] for b in steps] == [[2, 2], [2, 1]]
    tokenizer = build_tokenizer(tiny_world.vocab)
    first = {r["caption"].lower().rstrip(".") for r in records[:5]}
    second = {r["caption"].lower().rstrip(".") for r in records[5:]}
    for batch in steps:
        n = batch["segments"][0]
        assert batch["image"].shape[0] == batch["input_ids"].shape[0] == sum(batch["segments"])
        assert {t.rstrip(" .") for t in texts(tokenizer, batch["input_ids"][:n])} <= first
        assert {t.rstrip(" .") for t in texts(tokenizer, batch["input_ids"][n:])} <= second
    # every VG record once over the two steps, in the source's own seeded order, the same on every pass
    seen = [t for b in steps for t in texts(tokenizer, b["input_ids"][b["segments"][0]:])]
    assert len(set(seen)) == 3
    again = list(dm.calibration_dataloader())
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(steps, again))
    # processes split the steps, not the rows of a step
    assert [b["segments"] for b in dm.calibration_dataloader(num_replicas=2, rank=1)] == [[2, 1]]
    assert len(list(dm.train_dataloader())) == 4  # pretraining stays one shuffled list: 8 records, batch 2
    with pytest.raises(ValueError, match="at least two sources"):
        datamodule(tiny_world, files[:1]).calibration_dataloader()


def test_num_batches_counts_steps(tiny_world, two_sources):
    """prune(num_batches=N) reads N steps, each 2 + 2 rows here (the authors' 3000 steps of 32 + 32)."""
    loader = datamodule(tiny_world, two_sources[0]).calibration_dataloader()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    result = prune(model, sparsity=0.5, calibration=loader, num_batches=1, forward=lambda m, b: m(b["image"]),
                   token_mask=lambda b: None)
    assert result.calibration == {"num_batches": 1, "num_samples": 4}


def test_blip_and_xvlm_text_formats(tiny_world, two_sources):
    tokenizer = build_tokenizer(tiny_world.vocab)
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    blip = next(iter(datamodule(tiny_world, two_sources[0], max_length=30).calibration_dataloader()))
    xvlm = next(iter(datamodule(tiny_world, two_sources[0], max_length=40, add_sep=False).calibration_dataloader()))
    assert blip["input_ids"].shape[1] == 30 and xvlm["input_ids"].shape[1] == 40
    for ids, att in zip(blip["input_ids"], blip["attention_mask"]):
        n = int(att.sum())
        assert ids[0] == cls and ids[n - 1] == sep and (ids[n:] == pad).all()
    for (ids, att), (blip_ids, blip_att) in zip(zip(xvlm["input_ids"], xvlm["attention_mask"]),
                                                zip(blip["input_ids"], blip["attention_mask"])):
        n = int(att.sum())
        assert ids[0] == cls and sep not in ids.tolist() and (ids[n:] == pad).all() and (att[:n] == 1).all()
        assert torch.equal(ids[:n], blip_ids[: int(blip_att.sum()) - 1])  # the same caption, [SEP] left out
    # long captions: [CLS] + the first 39 word pieces (XVLM), [CLS] + 28 + [SEP] (BLIP)
    words = [w for w in tokenizer.convert_ids_to_tokens(list(range(5, 50))) if w.isalpha()]
    long = " ".join(words * 2)
    pieces = tokenizer(long, add_special_tokens=False)["input_ids"]
    assert len(pieces) > 40
    ids, att = tokenize(tokenizer, [long, "a"], 40, add_sep=False)
    assert ids[0].tolist() == [cls, *pieces[:39]] and att[0].sum() == 40 and att[1].sum() == 2
    ids, att = tokenize(tokenizer, [long], 30)
    assert ids[0].tolist() == [cls, *pieces[:28], sep]


@pytest.mark.parametrize("method", ["multiflow", "snip"])
def test_the_prune_command_path_runs_paired_steps_on_a_tied_blip(tiny_world, two_sources, method):
    """A pruning recipe's path: the datamodule's paired steps, the module's calibration_step / pruning_loss."""
    from mflightning.cli.prune import _pruning_target
    from mflightning.pretrain import PretrainModule

    tiny = {"text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "max_position_embeddings": 32},
            "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
            "image_text_hidden_size": 16}
    torch.manual_seed(0)
    module = PretrainModule(backbone=tiny, tokenizer=tiny_world.vocab, tie_decoder=True)
    target, forward, loss = _pruning_target(module, "32-true", torch.device("cpu"))
    loader = datamodule(tiny_world, two_sources[0]).calibration_dataloader()
    # the fresh tiny ViT has layers whose weights tie at the threshold: left out, the text layers are what matter here
    result = prune(target, sparsity=0.5, method=method, exclude=[r"^vision_model\."], calibration=loader,
                   forward=forward, loss=loss)
    assert result.calibration == {"num_batches": 2, "num_samples": 7}
    assert result.sparsity >= 0.5 and "text_encoder.encoder.layer.0.crossattention.self.query.weight" in result.masks
