"""The processor datamodule helper: calibration and zero-shot retrieval batches from the project's records
through a transformers processor (built offline: CLIPImageProcessor + a CLIPTokenizer from a written vocab)."""
import json
import os

import pytest
import torch
from PIL import Image
from transformers import (AutoProcessor, CLIPImageProcessor, CLIPProcessor, SiglipImageProcessor,
                          SiglipProcessor)

from mflightning.testing import tiny_clip_tokenizer as clip_tokenizer
from mflightning.data import CalibrationConfig, ProcessorDataModule, processor_calibration_loader
from mflightning.data.datamodule_base import ShardSampler
from mflightning.data.processor import ProcessorCalibrationCollate, load_processor

MAX_LENGTH = 24


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, tiny_world):
    with open(tiny_world.vocab) as f:
        words = f.read().split()
    return clip_tokenizer(str(tmp_path_factory.mktemp("clip_vocab")), words)


@pytest.fixture(scope="module")
def processor(tokenizer):
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_rgb(path):
    with Image.open(path) as im:
        return im.convert("RGB")


def records(path):
    with open(path) as f:
        return json.load(f)


def test_calibration_batches_are_the_processors_output(tiny_world, processor, tokenizer):
    loader = processor_calibration_loader(tiny_world.calibration, tiny_world.image_root, processor, batch_size=3,
                                          max_length=MAX_LENGTH, crop_scale=None, raw_captions=True, seed=1)
    calibration = records(tiny_world.calibration)
    order = list(ShardSampler(len(calibration), shuffle=True, seed=1))
    assert order != sorted(order)  # a shuffled order, which the batches follow
    seen = 0
    for batch in loader:
        assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}  # model(**batch) works as is
        n = batch["pixel_values"].size(0)
        assert batch["pixel_values"].shape == (n, 3, 16, 16)
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (n, MAX_LENGTH)
        picked = [calibration[i] for i in order[seen:seen + n]]
        direct = processor(images=[load_rgb(os.path.join(tiny_world.image_root, r["image"])) for r in picked],
                           text=[r["caption"] for r in picked], padding="max_length", max_length=MAX_LENGTH,
                           truncation=True, return_tensors="pt")
        torch.testing.assert_close(batch["pixel_values"], direct["pixel_values"])
        assert torch.equal(batch["input_ids"], direct["input_ids"])
        assert torch.equal(batch["attention_mask"], direct["attention_mask"])
        # padding: CLIP pads with its end token after the caption's own end token, masked out
        lengths = batch["attention_mask"].sum(1)
        assert (lengths < MAX_LENGTH).any()
        for row, length in zip(batch["input_ids"], lengths.tolist()):
            assert row[0] == tokenizer.bos_token_id and row[length - 1] == tokenizer.eos_token_id
            assert (row[length:] == tokenizer.pad_token_id).all()
        seen += n
    assert seen == len(calibration)


def test_cleaned_captions_prompt_and_longest_padding(tiny_world, processor, tokenizer):
    loader = processor_calibration_loader(tiny_world.calibration, tiny_world.image_root, processor, batch_size=4,
                                          max_length=None, padding="longest", prompt="a photo of {caption}",
                                          crop_scale=None)
    batch = next(iter(loader))
    dataset = loader.dataset
    texts = ["a photo of " + dataset.texts[i] for i in list(loader.sampler)[:4]]
    expected = tokenizer(texts, padding="longest", return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert batch["input_ids"].size(1) == int(batch["attention_mask"].sum(1).max())  # padded to the longest only
    prefix = tokenizer("a photo of")["input_ids"][:-1]  # without its end token
    assert batch["input_ids"][:, :len(prefix)].tolist() == [prefix] * 4


def test_calibration_crops_come_before_the_processor(tiny_world, processor):
    loader = processor_calibration_loader(tiny_world.calibration, tiny_world.image_root, processor, batch_size=8,
                                          max_length=MAX_LENGTH, image_size=24, crop_scale=(0.2, 0.3), hflip=False)
    plain = processor_calibration_loader(tiny_world.calibration, tiny_world.image_root, processor, batch_size=8,
                                         max_length=MAX_LENGTH, crop_scale=None)
    cropped, whole = next(iter(loader)), next(iter(plain))
    assert cropped["pixel_values"].shape == whole["pixel_values"].shape == (8, 3, 16, 16)  # the processor's size
    assert not torch.allclose(cropped["pixel_values"], whole["pixel_values"])
    assert torch.equal(cropped["input_ids"], whole["input_ids"])  # same order and captions
    torch.rand(5)  # the crops are seeded per item, not drawn from the global RNG
    assert torch.equal(next(iter(loader))["pixel_values"], cropped["pixel_values"])
    dm = ProcessorDataModule(processor, image_root=tiny_world.image_root, num_workers=0,
                             calibration=CalibrationConfig(tiny_world.calibration, batch_size=8, image_size=24,
                                                           max_length=MAX_LENGTH, crop_scale=(0.2, 0.3)))
    first = next(iter(dm.calibration_dataloader()))["pixel_values"]
    torch.rand(5)
    assert torch.equal(next(iter(dm.calibration_dataloader()))["pixel_values"], first)


def test_calibration_shards_split_the_batches_without_overlap(tiny_world, processor):
    dm = ProcessorDataModule(processor, image_root=tiny_world.image_root, num_workers=0,
                             calibration=CalibrationConfig(tiny_world.calibration, batch_size=2,
                                                           max_length=MAX_LENGTH))
    counts = [sum(b["input_ids"].size(0) for b in dm.calibration_dataloader(num_replicas=2, rank=r)) for r in (0, 1)]
    orders = [list(dm.calibration_dataloader(num_replicas=2, rank=r).sampler) for r in (0, 1)]
    assert not set(orders[0]) & set(orders[1])
    assert sorted(orders[0] + orders[1]) == list(range(len(records(tiny_world.calibration))))
    assert sum(counts) == len(records(tiny_world.calibration))


def test_eval_batches_carry_every_caption_with_its_global_indices(tiny_world, processor, tiny_sizes):
    dm = ProcessorDataModule(processor, image_root=tiny_world.image_root, test_json=tiny_world.retrieval_test,
                             val_json=tiny_world.retrieval_val, eval_batch_size=2, num_workers=0,
                             max_length=MAX_LENGTH, raw_captions=True)
    dm.setup("test")
    test = records(tiny_world.retrieval_test)
    caption_image = [(c, i) for i, r in enumerate(test) for c in r["caption"]]
    text_idx, image_idx = [], []
    for batch in dm.test_dataloader():
        assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_idx", "text_idx", "text_image_idx"}
        n_img, n_txt = batch["pixel_values"].size(0), batch["input_ids"].size(0)
        assert batch["pixel_values"].shape == (n_img, 3, 16, 16) and batch["image_idx"].shape == (n_img,)
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (n_txt, MAX_LENGTH)
        assert batch["text_idx"].shape == batch["text_image_idx"].shape == (n_txt,)
        assert n_txt > n_img  # several captions per image
        assert set(batch["text_image_idx"].tolist()) == set(batch["image_idx"].tolist())
        captions = [caption_image[t][0] for t in batch["text_idx"].tolist()]
        direct = processor(text=captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                           return_tensors="pt")
        assert torch.equal(batch["input_ids"], direct["input_ids"])
        assert batch["text_image_idx"].tolist() == [caption_image[t][1] for t in batch["text_idx"].tolist()]
        images = [load_rgb(os.path.join(tiny_world.image_root, test[i]["image"])) for i in batch["image_idx"].tolist()]
        torch.testing.assert_close(batch["pixel_values"], processor(images=images, return_tensors="pt")["pixel_values"])
        text_idx += batch["text_idx"].tolist()
        image_idx += batch["image_idx"].tolist()
    assert sorted(text_idx) == list(range(len(caption_image)))
    assert sorted(image_idx) == list(range(tiny_sizes.test))
    assert next(iter(dm.val_dataloader()))["pixel_values"].size(1) == 3


def test_a_saved_processor_loads_by_path_on_first_use(tiny_world, processor, tmp_path):
    processor.save_pretrained(tmp_path / "processor")
    assert type(AutoProcessor.from_pretrained(tmp_path / "processor")) is CLIPProcessor
    dm = ProcessorDataModule(str(tmp_path / "processor"), image_root=tiny_world.image_root, num_workers=0,
                             test_json=tiny_world.retrieval_test, max_length=MAX_LENGTH)
    assert dm._processor is None  # nothing read at construction
    given = ProcessorDataModule(processor, image_root=tiny_world.image_root, num_workers=0,
                                test_json=tiny_world.retrieval_test, max_length=MAX_LENGTH)
    a, b = next(iter(dm.test_dataloader())), next(iter(given.test_dataloader()))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    missing = ProcessorDataModule(str(tmp_path / "nowhere"), image_root=tiny_world.image_root)
    with pytest.raises(OSError, match="nowhere"):
        _ = missing.processor


def test_siglip_processor_batches(tiny_world, tokenizer):
    siglip = SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 16, "width": 16}),
                             tokenizer=tokenizer)
    dm = ProcessorDataModule(siglip, image_root=tiny_world.image_root, test_json=tiny_world.retrieval_test,
                             num_workers=0, max_length=MAX_LENGTH,
                             calibration=CalibrationConfig(tiny_world.calibration, batch_size=4, max_length=16))
    calibration = next(iter(dm.calibration_dataloader()))
    assert calibration["pixel_values"].shape == (4, 3, 16, 16) and calibration["input_ids"].shape == (4, 16)
    batch = next(iter(dm.test_dataloader()))
    assert batch["input_ids"].size(1) == MAX_LENGTH and batch["input_ids"].size(0) == batch["text_idx"].numel()


class PromptCheckingProcessor:
    """A processor-like callable standing in for an LLM-VLM processor: it needs `<image>` in every text
    and the images in the same call (as LLaVA's expands the placeholder to the image's tokens)."""

    def __init__(self):
        self.calls = []

    def __call__(self, images=None, text=None, return_tensors=None, **kwargs):
        self.calls.append((images, text, kwargs))
        assert return_tensors == "pt"
        if any("<image>" not in t for t in text):
            raise ValueError("every text needs the <image> placeholder")
        n = len(text)
        return {"pixel_values": torch.stack([torch.zeros(3, 4, 4) for _ in images]),
                "input_ids": torch.ones(n, 7, dtype=torch.long), "attention_mask": torch.ones(n, 7, dtype=torch.long),
                "image_sizes": torch.tensor([im.size[::-1] for im in images])}


def test_llm_vlm_prompt_template_reaches_the_processor_with_its_images(tiny_world):
    fake = PromptCheckingProcessor()
    loader = processor_calibration_loader(tiny_world.calibration, tiny_world.image_root, fake, batch_size=2,
                                          prompt="USER: <image>\n{caption} ASSISTANT:", max_length=None,
                                          padding="longest", truncation=False, crop_scale=None,
                                          processor_kwargs={"add_special_tokens": True})
    batch = next(iter(loader))
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_sizes"}  # all the processor gave
    images, texts, kwargs = fake.calls[-1]
    assert len(images) == len(texts) == 2 and all(isinstance(im, Image.Image) for im in images)
    captions = [loader.dataset.texts[i] for i in list(loader.sampler)[:2]]
    assert texts == [f"USER: <image>\n{c} ASSISTANT:" for c in captions]
    assert kwargs == {"padding": "longest", "truncation": False, "add_special_tokens": True}  # no max_length


def test_bad_settings_name_the_problem(tiny_world, processor):
    with pytest.raises(ValueError, match=r"\{caption\}"):
        ProcessorCalibrationCollate(processor, prompt="USER: <image>")
    with pytest.raises(ValueError, match="needs max_length"):
        ProcessorDataModule(processor, max_length=None)
    with pytest.raises(ValueError, match="padding must be one of"):
        ProcessorDataModule(processor, padding="left")
    with pytest.raises(TypeError, match="processor must be"):
        load_processor(42)
    with pytest.raises(ValueError, match="no calibration data"):
        ProcessorDataModule(processor).calibration_dataloader()
    with pytest.raises(ValueError, match="no test_json"):
        ProcessorDataModule(processor).test_dataloader()
    with pytest.raises(TypeError, match="expected a mapping"):
        next(iter(processor_calibration_loader(tiny_world.calibration, tiny_world.image_root, lambda **kw: [1],
                                               batch_size=2, crop_scale=None)))
    with pytest.raises(KeyError, match="lacks"):
        next(iter(processor_calibration_loader(tiny_world.calibration, tiny_world.image_root,
                                               lambda **kw: {"input_ids": torch.ones(2, 3)}, batch_size=2,
                                               crop_scale=None)))
