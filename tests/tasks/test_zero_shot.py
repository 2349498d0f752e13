"""Zero-shot retrieval of tiny random CLIP / SigLIP dual encoders: the module's recalls against a direct
computation on the same features, trainer.test / validate, deduplication, MultiFlowCallback at test start."""
import json
import os
import re

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, SiglipConfig,
                          SiglipModel)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mflightning import MultiFlowCallback
from mflightning.testing import tiny_clip_tokenizer as clip_tokenizer
from mflightning.data import CalibrationConfig, ProcessorDataModule, WorldSizes, clean_text, generate_world
from mflightning.tasks import ZeroShotRetrievalModule
from mflightning.tasks.zero_shot import as_features

MAX_LENGTH = 24
SIZES = WorldSizes(calibration=16, train=2, val=6, test=12, vqa_train=2, vg=2, vqa_test=2, questions_per_image=1)
# What the recognised "clip" / "siglip" presets (models/hf_families.py) must keep dense.
EXCLUDE = {"clip": [r"visual_projection", r"text_projection"],
           "siglip": [r"text_model\.head\.", r"vision_model\.head\."]}


def tiny_model(kind, tokenizer, seed=0):
    """A random dual encoder: 2 layers, width 32, 16 px images in 4 px patches."""
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(tower, vocab_size=len(tokenizer), max_position_embeddings=MAX_LENGTH,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(tower, image_size=16, patch_size=4)
    if kind == "clip":
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    return SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), seed=0, sizes=SIZES, image_size=32)


@pytest.fixture(scope="module")
def processor(tmp_path_factory, world):
    with open(world.vocab) as f:
        tokenizer = clip_tokenizer(str(tmp_path_factory.mktemp("vocab")), f.read().split())
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def datamodule(world, processor, **kwargs):
    kwargs.setdefault("calibration", CalibrationConfig(world.calibration, batch_size=4, max_length=MAX_LENGTH))
    return ProcessorDataModule(processor, image_root=world.image_root, val_json=world.retrieval_val,
                               test_json=world.retrieval_test, eval_batch_size=5, num_workers=0,
                               max_length=MAX_LENGTH, **kwargs)


def trainer(**kwargs):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def direct_features(model, world, processor, records_json, use_mask=True):
    """Every image and caption of the records in file order, through the processor and the model's own
    get_*_features (pooler_output in transformers 5), L2-normalised, and caption -> image."""
    with open(records_json) as f:
        records = json.load(f)
    images = []
    for r in records:
        with Image.open(os.path.join(world.image_root, r["image"])) as im:
            images.append(im.convert("RGB"))
    captions = [(c, i) for i, r in enumerate(records) for c in r["caption"]]
    text = processor(text=[clean_text(c) for c, _ in captions], padding="max_length", max_length=MAX_LENGTH,
                     truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
        txt = model.get_text_features(input_ids=text["input_ids"],
                                      **({"attention_mask": text["attention_mask"]} if use_mask else {}))
    img, txt = [o.pooler_output if not isinstance(o, torch.Tensor) else o for o in (img, txt)]
    return (torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1),
            [i for _, i in captions])


def direct_recalls(image_feats, text_feats, text_image):
    """R@k by sorting each query's candidates by cosine (text retrieval: best rank of an image's captions)."""
    sims = image_feats.double() @ text_feats.double().t()
    text_image = torch.tensor(text_image)
    text_ranks = []
    for i in range(sims.size(0)):
        order = sims[i].argsort(descending=True)
        text_ranks.append(int(torch.nonzero(text_image[order] == i).min()))
    image_ranks = []
    for t in range(sims.size(1)):
        order = sims[:, t].argsort(descending=True)
        image_ranks.append(int(torch.nonzero(order == text_image[t]).item()))
    out = {}
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100.0 * sum(r < k for r in text_ranks) / len(text_ranks)
        out[f"img_r{k}"] = 100.0 * sum(r < k for r in image_ranks) / len(image_ranks)
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in (1, 5, 10)) / 3
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in (1, 5, 10)) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def assert_recalls(metrics, expected):
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_trainer_test_matches_a_direct_computation(kind, world, processor):
    model = tiny_model(kind, processor.tokenizer)
    module = ZeroShotRetrievalModule(model)
    run = trainer()
    run.test(module, datamodule=datamodule(world, processor))
    metrics = module.eval_results["test"]
    expected = direct_recalls(*direct_features(model, world, processor, world.retrieval_test))
    assert_recalls(metrics, expected)
    assert 0 < expected["txt_r1"] < 100 and expected["img_r5"] < 100  # 12 images, 47 captions: not trivial
    with open(world.retrieval_test) as f:
        n_captions = sum(len(r["caption"]) for r in json.load(f))
    assert metrics["num_images"] == SIZES.test and metrics["num_texts"] == n_captions
    assert run.callback_metrics["test/r_mean"].item() == pytest.approx(expected["r_mean"], abs=1e-4)

    module.eval_results.clear()
    trainer().validate(module, datamodule=datamodule(world, processor))
    assert_recalls(module.eval_results["val"],
                   direct_recalls(*direct_features(model, world, processor, world.retrieval_val)))


def test_images_and_captions_seen_twice_count_once(world, processor):
    """A padding sampler (DistributedSampler with uneven shards) repeats samples: the recall is unchanged."""
    model = tiny_model("clip", processor.tokenizer)
    dm = datamodule(world, processor)
    dm.setup("test")
    loader = dm.test_dataloader()
    n = len(dm.dataset("test"))
    repeated = DataLoader(dm.dataset("test"), batch_size=5, sampler=list(range(n)) + [3, 0, 7, 3],
                          collate_fn=loader.collate_fn)
    module = ZeroShotRetrievalModule(model)
    trainer().test(module, dataloaders=repeated)
    metrics = module.eval_results["test"]
    assert metrics["num_images"] == n
    assert_recalls(metrics, direct_recalls(*direct_features(model, world, processor, world.retrieval_test)))


def test_siglip_text_encoder_without_the_attention_mask(world, processor):
    """SigLIP pools the last position, so the mask changes its text features; use_attention_mask=False drops it."""
    model = tiny_model("siglip", processor.tokenizer)
    module = ZeroShotRetrievalModule(model, use_attention_mask=False)
    trainer().test(module, datamodule=datamodule(world, processor))
    unmasked = direct_features(model, world, processor, world.retrieval_test, use_mask=False)
    masked = direct_features(model, world, processor, world.retrieval_test, use_mask=True)
    assert not torch.allclose(unmasked[1], masked[1], atol=1e-4)
    assert_recalls(module.eval_results["test"], direct_recalls(*unmasked))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_multiflow_callback_prunes_at_test_start(kind, world, processor):
    model = tiny_model(kind, processor.tokenizer)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = ZeroShotRetrievalModule(model)
    callback = MultiFlowCallback(sparsity=0.5)  # modalities=None: the preset recognised from the model
    dm = datamodule(world, processor)
    trainer(callbacks=[callback]).test(module, datamodule=dm)

    assert callback.result is not None and callback.result.calibration  # calibrated on the processor batches
    measured = callback.measured_sparsity()
    assert measured["total"] == pytest.approx(0.5, abs=0.01)
    assert set(measured) >= {"vision", "text"}
    masks = callback.kept_masks
    assert any(n.startswith("model.vision_model.") for n in masks) and any(n.startswith("model.text_model.")
                                                                           for n in masks)
    for name, param in module.named_parameters():
        if name in masks:  # zeros exactly where pruned
            assert torch.equal(param.detach() == 0, ~masks[name] | (dense[name[len("model."):]] == 0))
    for pattern in EXCLUDE[kind]:
        kept = [n for n in dict(module.named_parameters()) if re.search(pattern, n)]
        assert kept and not any(n in masks for n in kept)
        assert all(torch.equal(dict(module.named_parameters())[n].detach(), dense[n[len("model."):]]) for n in kept)
    # the recall is the pruned model's, matching a direct computation on the pruned weights
    assert_recalls(module.eval_results["test"],
                   direct_recalls(*direct_features(model, world, processor, world.retrieval_test)))


def test_model_by_path_and_feature_outputs(tmp_path, processor):
    model = tiny_model("clip", processor.tokenizer)
    model.save_pretrained(tmp_path / "clip")
    loaded = ZeroShotRetrievalModule(str(tmp_path / "clip"))
    assert type(loaded.model) is CLIPModel and loaded.hparams.model == str(tmp_path / "clip")
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))
    with pytest.raises(TypeError, match="not a dual encoder"):
        ZeroShotRetrievalModule(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model_kwargs"):
        ZeroShotRetrievalModule(model, model_kwargs={"torch_dtype": "float32"})

    x = torch.randn(3, 8)
    assert as_features(x, "image") is x
    output = BaseModelOutputWithPooling(last_hidden_state=torch.zeros(3, 4, 8), pooler_output=x)  # transformers 5
    assert as_features(output, "image") is x
    assert as_features((torch.zeros(3, 4, 8), x), "text") is x
    with pytest.raises(TypeError, match="without pooler_output"):
        as_features({"last_hidden_state": x}, "text")
    with pytest.raises(ValueError, match=r"expected \(batch, dim\)"):
        as_features(torch.zeros(3, 4, 8), "image")
    with pytest.raises(KeyError, match="lacks"):
        ZeroShotRetrievalModule(model).calibration_step({"input_ids": torch.ones(1, 3, dtype=torch.long)})
