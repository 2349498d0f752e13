"""Every datamodule yields the design.md batches (keys, shapes, dtypes) from a tiny generated world."""

import json
from types import SimpleNamespace

from typing import Literal

import pytest
import torch

from mflightning.data import (
    CalibrationConfig,
    CalibrationDataModule,
    CaptionDataModule,
    RetrievalDataModule,
    VQADataModule,
    clean_text,
)

SIZE, L = 32, 16


def _load(path):
    with open(path) as f:
        return json.load(f)


def _common(world):
    return dict(image_root=world.image_root, tokenizer=world.vocab, image_size=SIZE, batch_size=4,
                num_workers=0, max_length=L, augment=False, hflip=False)


def _check_image(batch, b):
    assert batch["image"].shape == (b, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32


def _check_text(ids, mask, rows):
    assert ids.shape == (rows, L) and mask.shape == (rows, L)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert (ids[:, 0] == 2).all() and ((mask == 0) | (mask == 1)).all()


def test_calibration_batches_and_seeded_order(tiny_world):
    dm = CalibrationDataModule(tiny_world.calibration, tiny_world.image_root, tokenizer=tiny_world.vocab,
                               image_size=SIZE, batch_size=3, num_workers=0, max_length=L)
    dm.setup("fit")
    batches = list(dm.calibration_dataloader())
    assert [b["image"].shape[0] for b in batches] == [3, 3, 2]
    batch = batches[0]
    assert set(batch) == {"image", "input_ids", "attention_mask"}
    _check_image(batch, 3)
    _check_text(batch["input_ids"], batch["attention_mask"], 3)
    again = list(dm.calibration_dataloader())
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    shard0 = list(dm.calibration_dataloader(num_replicas=2, rank=0))
    shard1 = list(dm.calibration_dataloader(num_replicas=2, rank=1))
    assert sum(b["image"].shape[0] for b in shard0 + shard1) == 8
    assert len(list(dm.train_dataloader())) == 2  # pretraining: 8 pairs, batch 3, last partial dropped


def test_calibration_crops_are_seeded_per_item_and_leave_the_global_rng_alone(tiny_world):
    """Random crops, flips and torchvision's RandAugment (the authors' calibration transform) repeat exactly
    whatever ran before, and in loader workers; another seed gives other images; drawing them does not move
    torch's global RNG."""
    def images(seed, workers=0):
        dm = CalibrationDataModule(tiny_world.calibration, tiny_world.image_root, tokenizer=tiny_world.vocab,
                                   image_size=SIZE, batch_size=4, num_workers=workers, max_length=L, seed=seed,
                                   crop_scale=(0.2, 1.0), augment=True, hflip=True)
        return torch.cat([b["image"] for b in dm.calibration_dataloader()])

    torch.manual_seed(1)
    first = images(0)
    torch.rand(7)  # other draws from the global RNG in between
    assert torch.equal(images(0), first)
    assert torch.equal(images(0, workers=2), first)
    assert not torch.equal(images(1), first)
    dataset = CalibrationDataModule(tiny_world.calibration, tiny_world.image_root, tokenizer=tiny_world.vocab,
                                    image_size=SIZE, max_length=L, crop_scale=(0.2, 1.0)).dataset("calibration")
    state = torch.get_rng_state()
    dataset[0], dataset[1]
    assert torch.equal(torch.get_rng_state(), state)  # an item's crop does not consume the global RNG


def test_calibration_text_is_the_cleaned_caption(tiny_world):
    dm = CalibrationDataModule(tiny_world.calibration, tiny_world.image_root, tokenizer=tiny_world.vocab,
                               image_size=SIZE, batch_size=8, num_workers=0, max_length=30)
    batch = next(iter(dm.calibration_dataloader()))
    decoded = sorted(dm.tokenizer.decode(ids, skip_special_tokens=True) for ids in batch["input_ids"])
    assert decoded == sorted(clean_text(r["caption"]) for r in _load(tiny_world.calibration))


def test_retrieval_train_batches(tiny_world):
    dm = RetrievalDataModule(tiny_world.retrieval_train, tiny_world.retrieval_val, tiny_world.retrieval_test,
                             **_common(tiny_world))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "input_ids", "attention_mask", "image_idx"}
    _check_image(batch, 4)
    _check_text(batch["input_ids"], batch["attention_mask"], 4)
    assert batch["image_idx"].dtype == torch.long
    dataset = dm.dataset("train")
    records = _load(tiny_world.retrieval_train)
    ids = {}
    for r, idx in zip(records, dataset.image_idx):
        assert ids.setdefault(r["image_id"], idx) == idx  # captions of one image share its index
    assert sorted(set(ids.values())) == list(range(6))


@pytest.mark.parametrize("split", ["val", "test"])
def test_retrieval_eval_batches_carry_their_captions(tiny_world, split):
    dm = RetrievalDataModule(tiny_world.retrieval_train, tiny_world.retrieval_val, tiny_world.retrieval_test,
                             **_common(tiny_world), eval_batch_size=2)
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    records = _load(tiny_world.retrieval_val if split == "val" else tiny_world.retrieval_test)
    texts = [c for r in records for c in r["caption"]]
    seen_images, seen_texts = [], []
    for batch in loader:
        assert set(batch) == {"image", "image_idx", "text_input_ids", "text_attention_mask", "text_idx",
                              "text_image_idx"}
        b, t = batch["image"].shape[0], batch["text_idx"].shape[0]
        _check_image(batch, b)
        _check_text(batch["text_input_ids"], batch["text_attention_mask"], t)
        for key in ("image_idx", "text_idx", "text_image_idx"):
            assert batch[key].dtype == torch.long
        assert set(batch["text_image_idx"].tolist()) == set(batch["image_idx"].tolist())
        for row, (ti, ii) in enumerate(zip(batch["text_idx"].tolist(), batch["text_image_idx"].tolist())):
            assert texts[ti] in records[ii]["caption"]
            decoded = dm.tokenizer.decode(batch["text_input_ids"][row], skip_special_tokens=True)
            assert decoded == clean_text(texts[ti])[: len(decoded)]
        seen_images += batch["image_idx"].tolist()
        seen_texts += batch["text_idx"].tolist()
    assert sorted(seen_images) == list(range(3))
    assert sorted(seen_texts) == list(range(len(texts)))
    assert dm.dataset(split).num_texts == len(texts)


def test_eval_loader_under_ddp_covers_each_sample_once(tiny_world):
    seen = []
    for rank in range(2):
        dm = RetrievalDataModule(tiny_world.retrieval_train, tiny_world.retrieval_val, tiny_world.retrieval_test,
                                 **_common(tiny_world), eval_batch_size=1)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        seen += [i for batch in dm.test_dataloader() for i in batch["image_idx"].tolist()]
    assert sorted(seen) == [0, 1, 2]  # 3 images over 2 ranks: no padding duplicate


def test_train_loader_refuses_a_dataset_smaller_than_a_batch(tiny_world):
    dm = RetrievalDataModule(tiny_world.retrieval_train, **{**_common(tiny_world), "batch_size": 64})
    with pytest.raises(ValueError, match="fewer than batch_size=64"):
        dm.train_dataloader()


def test_caption_batches_prepend_the_prompt(tiny_world):
    dm = CaptionDataModule(tiny_world.caption_train, tiny_world.caption_val, tiny_world.caption_test,
                           **{**_common(tiny_world), "max_length": 30})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "input_ids", "attention_mask"}
    _check_image(batch, 4)
    prompt_ids = dm.tokenizer("a picture of ")["input_ids"][:-1]
    assert dm.prompt_length == len(prompt_ids) == 4
    assert (batch["input_ids"][:, : dm.prompt_length] == torch.tensor(prompt_ids)).all()
    decoded = dm.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    captions = {clean_text(r["caption"]) for r in _load(tiny_world.caption_train)}
    assert decoded.startswith("a picture of ") and decoded[len("a picture of "):] in captions

    records = _load(tiny_world.caption_test)
    batches = list(dm.test_dataloader())
    assert set(batches[0]) == {"image", "image_id", "captions"}
    _check_image(batches[0], 3)
    assert batches[0]["image_id"] == [r["image"].split("/")[-1][: -len(".png")] for r in records]
    assert batches[0]["captions"] == [r["caption"] for r in records]


def test_vqa_train_batches_weight_answers(tiny_world):
    dm = VQADataModule(tiny_world.vqa_train, tiny_world.vqa_test, tiny_world.answer_list,
                       val_json=tiny_world.vqa_test, **_common(tiny_world), answer_max_length=6,
                       vg_answer_weight=None)  # VG weighted like VQA: count / answers (default: 0.5 each)
    dm.train_json = [tiny_world.vqa_train, tiny_world.vg_train]
    dm.setup("fit")
    dataset = dm.dataset("train")
    records = _load(tiny_world.vqa_train) + _load(tiny_world.vg_train)
    assert len(dataset) == len(records)
    for i, r in enumerate(records):
        answers, weights = dataset.answer_weights(i)
        assert answers == list(dict.fromkeys(r["answer"]))
        assert weights == [r["answer"].count(a) / len(r["answer"]) for a in answers]
        assert abs(sum(weights) - 1) < 1e-6
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "question_input_ids", "question_attention_mask", "answer_input_ids",
                          "answer_attention_mask", "answer_weights", "n_answers"}
    _check_image(batch, 4)
    _check_text(batch["question_input_ids"], batch["question_attention_mask"], 4)
    a = int(batch["n_answers"].sum())
    assert batch["n_answers"].dtype == torch.long and batch["n_answers"].shape == (4,)
    assert batch["answer_input_ids"].shape == (a, 6) and batch["answer_attention_mask"].shape == (a, 6)
    assert batch["answer_weights"].shape == (a,) and batch["answer_weights"].dtype == torch.float32
    per_question = torch.split(batch["answer_weights"], batch["n_answers"].tolist())
    assert all(abs(float(w.sum()) - 1) < 1e-6 for w in per_question)


def test_vqa_fixed_vg_weight_and_answer_list(tiny_world):
    dm = VQADataModule(tiny_world.vg_train, None, tiny_world.answer_list, **_common(tiny_world),
                       vg_answer_weight=0.2)
    assert dm.dataset("train").answer_weights(0)[1] == [0.2]
    assert dm.answer_list == _load(tiny_world.answer_list) and "yes" in dm.answer_list


def test_vqa_eval_batches_carry_question_ids_and_answers(tiny_world):
    dm = VQADataModule(tiny_world.vqa_train, tiny_world.vqa_test, tiny_world.answer_list, **_common(tiny_world))
    records = _load(tiny_world.vqa_test)
    batches = list(dm.test_dataloader())
    assert set(batches[0]) == {"image", "question_input_ids", "question_attention_mask", "question_id", "answers"}
    _check_image(batches[0], 4)
    _check_text(batches[0]["question_input_ids"], batches[0]["question_attention_mask"], 4)
    assert [q for b in batches for q in b["question_id"]] == [r["question_id"] for r in records]
    assert [a for b in batches for a in b["answers"]] == [r["answer"] for r in records]


def test_vqa_eval_without_answers_and_missing_calibration(tiny_world, tmp_path):
    records = _load(tiny_world.vqa_test)
    for r in records:
        del r["answer"]
    path = tmp_path / "test_dev.json"
    path.write_text(json.dumps(records))
    dm = VQADataModule(None, str(path), None, **_common(tiny_world))
    batch = next(iter(dm.test_dataloader()))
    assert "answers" not in batch and len(batch["question_id"]) == 4
    with pytest.raises(ValueError, match=r"calibration\.json"):
        dm.calibration_dataloader()
    with pytest.raises(ValueError, match="answer_list_json"):
        dm.answer_list


def test_task_datamodules_offer_calibration_data(tiny_world):
    calibration = CalibrationConfig(tiny_world.calibration, image_size=24, batch_size=5, max_length=12)
    dm = CaptionDataModule(tiny_world.caption_train, **_common(tiny_world), calibration=calibration)
    batch = next(iter(dm.calibration_dataloader()))
    assert set(batch) == {"image", "input_ids", "attention_mask"}
    assert batch["image"].shape == (5, 3, 24, 24) and batch["input_ids"].shape == (5, 12)


def test_datamodule_drives_a_lightning_trainer(tiny_world, tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        """Counts what the trainer feeds it."""

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)
            self.val_images = []

        def training_step(self, batch, batch_idx):
            return self.layer(batch["image"].mean((2, 3))).mean()

        def validation_step(self, batch, batch_idx):
            self.val_images += batch["image_idx"].tolist()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = RetrievalDataModule(tiny_world.retrieval_train, tiny_world.retrieval_val, **_common(tiny_world))
    probe = Probe()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(probe, datamodule=dm)
    assert trainer.global_step == 2
    assert sorted(set(probe.val_images)) == [0, 1, 2]
    assert dm.hparams["train_json"] == tiny_world.retrieval_train and dm.hparams["batch_size"] == 4


def test_transform_switches_reach_the_datasets(tiny_world):
    from torchvision import transforms as T

    dm = RetrievalDataModule(tiny_world.retrieval_train, **{**_common(tiny_world), "augment": True},
                             crop_scale=(1.0, 1.0), calibration=CalibrationConfig(tiny_world.calibration))
    steps = dm.dataset("train").transform.transforms
    assert [type(t) for t in steps] == [T.RandomResizedCrop, T.RandAugment, T.ToTensor, T.Normalize]
    assert steps[0].scale == (1.0, 1.0) and steps[0].size == (SIZE, SIZE)
    calibration_steps = dm.dataset("calibration").transform.transforms
    assert calibration_steps[0].scale == (0.2, 1.0) and calibration_steps[0].size == (224, 224)
    cal = CalibrationDataModule(tiny_world.calibration, tiny_world.image_root, tokenizer=tiny_world.vocab)
    assert cal.dataset("calibration").transform.transforms[0].scale == (0.2, 1.0)
    with pytest.raises(ValueError, match="crop_scale"):
        RetrievalDataModule(tiny_world.retrieval_train, **_common(tiny_world), crop_scale=(0.0, 1.0))


def test_a_ready_tokenizer_object_is_used_as_is(tiny_world):
    from mflightning.data import build_tokenizer

    tokenizer = build_tokenizer(tiny_world.vocab)
    dm = CalibrationDataModule(tiny_world.calibration, tiny_world.image_root, tokenizer=tokenizer, image_size=SIZE,
                               num_workers=0)
    assert dm.tokenizer is tokenizer


def test_calibration_settings_are_checked_and_named():
    with pytest.raises(ValueError, match=r"calibration\.batch_size must be positive, got 0"):
        CalibrationConfig("c.json", batch_size=0)
    with pytest.raises(ValueError, match=r"calibration\.crop_scale"):
        CalibrationConfig("c.json", crop_scale=(0.5, 0.2))


# The shared arguments of VLDataModule, which the task datamodules take through **kwargs.
SHARED = {"tokenizer": str, "image_size": int, "batch_size": int, "eval_batch_size": int | None, "num_workers": int,
          "max_length": int, "skip_bad_records": bool, "augment": bool | Literal["torchvision", "authors"],
          "hflip": bool, "crop_scale": tuple[float, float], "seed": int,
          "text_cleaning": Literal["blip", "authors"], "calibration.json": str | list[str] | None,
          "calibration.image_root": str | None, "calibration.image_size": int, "calibration.batch_size": int,
          "calibration.max_length": int, "calibration.crop_scale": tuple[float, float]}


@pytest.mark.parametrize("cls, own", [
    (RetrievalDataModule, {"train_json": 35, "val_json": 35, "test_json": 35, "image_root": "."}),
    (CaptionDataModule, {"train_json": 40, "prompt": "a picture of ", "image_root": "."}),
    (VQADataModule, {"train_json": 35, "test_json": 35, "val_json": 35, "answer_list_json": None,
                     "answer_max_length": 10, "vg_answer_weight": 0.5}),
])
def test_recipes_see_every_argument_with_its_type(cls, own):
    """jsonargparse (LightningCLI, `mflightning check`) follows **kwargs to VLDataModule's typed arguments."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(cls, "data")
    actions = {a.dest[len("data."):]: a for a in parser._actions if a.dest.startswith("data.")}
    for name, hint in SHARED.items():
        assert name in actions, f"{cls.__name__}: {name} is not a recipe key"
        assert getattr(actions[name], "_typehint", None) == hint, (cls.__name__, name)
    assert set(own) <= set(actions)
    assert actions["max_length"].default == (40 if cls is CaptionDataModule else 35)  # a subclass's own default wins


def test_calibration_recipes_see_their_own_arguments_only():
    """CalibrationDataModule derives its calibration settings and has no evaluation batches: not recipe keys."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(CalibrationDataModule, "data")
    actions = {a.dest[len("data."):]: a for a in parser._actions if a.dest.startswith("data.")}
    assert set(actions) == {"calibration_json", "image_root", "image_size", "batch_size", "max_length", "crop_scale",
                            "pair_sources", "add_sep", "tokenizer", "num_workers", "skip_bad_records", "augment", "hflip",
                            "seed", "text_cleaning"}
    assert (actions["image_size"].default, actions["max_length"].default, actions["crop_scale"].default) == \
        (224, 30, (0.2, 1.0))
    assert actions["tokenizer"]._typehint is str and actions["seed"]._typehint is int


def test_hyperparameters_hold_every_argument(tiny_world):
    dm = CaptionDataModule(tiny_world.caption_train, **_common(tiny_world))
    assert dm.hparams["prompt"] == "a picture of " and dm.hparams["seed"] == 0 and dm.hparams["eval_batch_size"] is None
    assert dm.hparams["calibration"] == CalibrationConfig()
    cal = CalibrationDataModule(tiny_world.calibration, tiny_world.image_root, tokenizer=tiny_world.vocab)
    assert "calibration" not in cal.hparams and cal.hparams["calibration_json"] == tiny_world.calibration
