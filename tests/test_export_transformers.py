"""transformers-native export: fine-tuned BLIP task modules load as transformers' Blip* classes with equal outputs;
transformers' own families round-trip through save_pretrained; model card, mask file, refusals."""
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import (BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering,
                          BlipProcessor)

sys.path[:0] = [str(Path(__file__).parent / "tasks"), str(Path(__file__).parent / "models")]
from task_fixtures import (ANSWERS, BLIP, MAX_LEN, WORDS, XVLM, calibration_batch, caption_loaders,  # noqa: E402
                           captions_for, make_images, tokenize, trainer_kwargs)

from mflightning import MultiFlowCallback, PruningResult, prune  # noqa: E402
from mflightning.data.tokenizer import build_tokenizer, write_vocab  # noqa: E402
from mflightning.data.transforms import CLIP_STD, build_test_transform  # noqa: E402
from mflightning.export import export_transformers  # noqa: E402
from mflightning.export.transformers_export import generation_settings  # noqa: E402
from mflightning.models.blip import honour_cross_attention_masks  # noqa: E402
from mflightning.pruning.checksum import tensors_checksum  # noqa: E402

CLASSES = {"retrieval": BlipForImageTextRetrieval, "captioning": BlipForConditionalGeneration,
           "vqa": BlipForQuestionAnswering}
ATOL = 1e-5


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Linear weights at std 0.2: BLIP's 0.02 init makes a tiny model's outputs nearly input-independent."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.2)


def pruned_module(task: str, vocab: str, **kwargs):
    """A tiny BLIP task module, MultiFlow-pruned at 50% on one calibration batch, masks applied."""
    torch.manual_seed(0)
    module = BLIP.module(task, vocab, **kwargs).eval()
    _randomise(module.backbone)
    result = prune(module.backbone, sparsity=0.5, calibration=[calibration_batch(module.tokenizer)])
    result.apply(module.backbone)
    return module, result


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt", WORDS)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, vocab):
    """Each task exported once: task -> (module, result, folder)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for task in CLASSES:
        module, result = pruned_module(task, vocab, **({"max_generated_length": 12} if task == "captioning" else {}))
        result.save(root / f"{task}-masks.safetensors")
        metrics = {"test/cider": 12.5} if task == "captioning" else None
        export_transformers(module, root / task, masks=root / f"{task}-masks.safetensors", metrics=metrics)
        out[task] = (module, result, root / task)
    return out


def test_retrieval_export_gives_the_modules_itc_and_itm_scores(exports):
    module, _, folder = exports["retrieval"]
    model, info = BlipForImageTextRetrieval.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    processor = BlipProcessor.from_pretrained(folder)
    images, labels = make_images(4)
    texts = [captions_for(label)[0] for label in labels]
    enc = processor(text=texts, padding="max_length", max_length=MAX_LEN, return_tensors="pt")
    ids, att = tokenize(module.tokenizer, texts)
    assert torch.equal(enc.input_ids, ids) and torch.equal(enc.attention_mask, att)
    backbone = module.backbone
    with torch.no_grad():
        image_embeds = backbone.encode_image(images)
        our_itc = backbone.image_features(image_embeds) @ backbone.text_features(backbone.encode_text(ids, att)).T
        our_itm = backbone.match_logits(module.grounded_ids(ids), att, image_embeds)
        hf_itc = model(input_ids=ids, pixel_values=images, attention_mask=att, use_itm_head=False).itm_score
        itm_ids = ids.clone()
        itm_ids[:, 0] = model.config.enc_token_id  # what the card tells users to do
        hf_itm = model(input_ids=itm_ids, pixel_values=images, attention_mask=att).itm_score
    assert our_itc.std() > 0.01 and our_itm.std() > 0.01  # scores that tell pairs apart
    torch.testing.assert_close(hf_itc, our_itc, atol=ATOL, rtol=0)
    torch.testing.assert_close(hf_itm, our_itm, atol=ATOL, rtol=0)


def test_captioning_export_generates_the_modules_captions_token_for_token(exports):
    module, _, folder = exports["captioning"]
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    processor = BlipProcessor.from_pretrained(folder)
    images, _ = make_images(4, seed=3)
    prompt = processor(text=[module.prompt] * 4, return_tensors="pt")
    hf_ids = model.generate(pixel_values=images, **prompt, **generation_settings(model))
    assert "num_beams=3, min_length=5, max_length=12" in (folder / "README.md").read_text()  # what the card says
    start = prompt.input_ids.size(1) - 1  # generate drops the prompt's [SEP]
    ours = module.backbone.generate_caption(
        module.decoder_ids(prompt.input_ids[:, :-1]), module.backbone.encode_image(images),
        num_beams=module.num_beams, min_length=module.min_generated_length, max_length=module.max_generated_length,
        eos_token_id=module.sep_token_id, pad_token_id=module.pad_token_id)
    assert hf_ids[:, start:].tolist() == ours
    captions = module.generate(images)
    assert len(set(captions)) > 1  # the images get different captions
    assert [c.strip() for c in processor.batch_decode(hf_ids[:, start:], skip_special_tokens=True)] == captions


def test_a_transformers_pipeline_captions_an_image_as_the_module_does(exports):
    from transformers import pipeline

    module, _, folder = exports["captioning"]
    image = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8"))
    pipe = pipeline("image-text-to-text", model=str(folder))
    out = pipe(images=image, text=module.prompt, generate_kwargs=generation_settings(pipe.model))
    pixels = build_test_transform(module.backbone.image_size)(image).unsqueeze(0)
    caption = out[0]["generated_text"][len(out[0]["input_text"]):].strip()
    assert caption == module.generate(pixels)[0]


def test_the_processor_prepares_images_as_our_test_transform(exports):
    _, _, folder = exports["captioning"]
    image = Image.fromarray((np.random.default_rng(1).random((40, 48, 3)) * 255).astype("uint8"))
    pixels = BlipProcessor.from_pretrained(folder)(images=image, return_tensors="pt").pixel_values
    ours = build_test_transform(32)(image).unsqueeze(0)
    assert pixels.shape == ours.shape
    # the two bicubic resizes round a few values to the neighbouring 8-bit level, nothing more
    level = 1 / 255 / min(CLIP_STD)
    assert (pixels - ours).abs().max() <= level * 1.001 and ((pixels - ours).abs() > 1e-5).float().mean() < 0.01


def test_vqa_export_answers_as_the_module(exports):
    module, _, folder = exports["vqa"]
    model = BlipForQuestionAnswering.from_pretrained(folder).eval()
    processor = BlipProcessor.from_pretrained(folder)
    images, _ = make_images(4, seed=5)
    questions = ["what color is it", "what shape is it"] * 2  # equal lengths: no padding
    enc = processor(text=questions, return_tensors="pt", padding="longest")
    assert (enc.input_ids[:, 0] == module.enc_token_id).all()  # BLIP's [ENC], written by the exported processor
    our_ids = module.tokenizer(questions, return_tensors="pt", padding="longest")
    with torch.no_grad():
        states = module.encode_question(images, our_ids.input_ids, our_ids.attention_mask)
        hf_states = _question_states(model, enc, images)
        torch.testing.assert_close(hf_states, states, atol=ATOL, rtol=0)
        settings = dict(num_beams=1, max_length=6, eos_token_id=module.sep_token_id, pad_token_id=module.pad_token_id)
        start = torch.full((4, 1), module.dec_token_id)
        ours = module.backbone.text_decoder.generate(input_ids=start, encoder_hidden_states=states,
                                                     encoder_attention_mask=our_ids.attention_mask, **settings)
        hf = model.generate(input_ids=enc.input_ids, pixel_values=images, attention_mask=enc.attention_mask,
                            num_beams=1, max_length=6)
    assert hf.tolist() == ours.tolist()
    batch = {"image": images, "question_input_ids": our_ids.input_ids,
             "question_attention_mask": our_ids.attention_mask}
    answers = module.predict_answers(batch)
    assert answers == _rank_with(model, enc, images, module)


def _question_states(model, enc, images):
    """transformers' VQA question encoding (its text encoder attending to its image tokens)."""
    image_states = model.vision_model(images).last_hidden_state
    return model.text_encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                              encoder_hidden_states=image_states).last_hidden_state


def _rank_with(model, enc, images, module):
    """The module's ranking rule (full answer log-likelihood over the list) computed with transformers' modules."""
    tokens = module.tokenizer(ANSWERS, padding="longest", return_tensors="pt")
    answer_ids = module.decoder_ids(tokens.input_ids)
    chosen = []
    with torch.no_grad():
        states = _question_states(model, enc, images)
        for q in range(images.size(0)):
            logits = model.text_decoder(
                input_ids=answer_ids, attention_mask=tokens.attention_mask,
                encoder_hidden_states=states[q:q + 1].expand(len(ANSWERS), -1, -1)).logits
            logp = logits[:, :-1].log_softmax(-1).gather(-1, answer_ids[:, 1:, None])[..., 0]
            chosen.append(ANSWERS[int((logp * tokens.attention_mask[:, 1:]).sum(1).argmax())])
    return chosen


def test_vqa_padded_questions_need_the_cross_attention_mask_the_card_names(exports):
    """transformers drops the question mask in the decoder's cross-attention: the card says so and names the fix."""
    module, _, folder = exports["vqa"]
    model = BlipForQuestionAnswering.from_pretrained(folder).eval()
    images, _ = make_images(2, seed=6)
    questions = ["what color is it", "what is it"]
    enc = BlipProcessor.from_pretrained(folder)(text=questions, return_tensors="pt", padding="longest")
    assert enc.attention_mask[1, -1] == 0
    ours_ids = module.tokenizer(questions, return_tensors="pt", padding="longest")
    answer = module.decoder_ids(module.tokenizer(["red"], return_tensors="pt").input_ids).expand(2, -1)

    def logits(decode):
        with torch.no_grad():
            return decode(answer)

    states = module.encode_question(images, ours_ids.input_ids, ours_ids.attention_mask).detach()
    ours = logits(lambda a: module.backbone.decode(a, torch.ones_like(a), states, ours_ids.attention_mask))

    def hf(a):
        return model.text_decoder(input_ids=a, encoder_hidden_states=states,
                                  encoder_attention_mask=enc.attention_mask).logits

    unmasked = logits(hf)
    assert not torch.allclose(unmasked[1], ours[1], atol=1e-3), "transformers now honours the mask: update the card"
    torch.testing.assert_close(unmasked[0], ours[0], atol=ATOL, rtol=0)  # the unpadded question agrees
    honour_cross_attention_masks(model.text_decoder)
    torch.testing.assert_close(logits(hf), ours, atol=ATOL, rtol=0)
    assert "honour_cross_attention_masks" in (folder / "README.md").read_text()


@pytest.mark.parametrize("task", list(CLASSES))
def test_pruned_weights_are_exact_zeros_and_the_card_and_mask_file_say_what_was_done(exports, task):
    module, result, folder = exports[task]
    model = CLASSES[task].from_pretrained(folder)
    masks = PruningResult.load(folder / "masks.safetensors")
    params = dict(model.named_parameters())
    assert masks.masks and set(masks.masks) <= set(params)
    for name, mask in masks.masks.items():
        assert torch.equal(mask, result.masks_for(module.backbone, partial=True)[name])
        assert (params[name][~mask] == 0).all() and (params[name][mask] != 0).all()
    masks.apply(model)  # the mask file applies to transformers' class as is (names and coverage)
    card = (folder / "README.md").read_text()
    digest = hashlib.sha256((folder / "masks.safetensors").read_bytes()).hexdigest()
    assert f"`{digest}`" in card
    assert f"| task | {task} |" in card and f"`{CLASSES[task].__name__}`" in card
    assert "multiflow (target sparsity 0.5" in card
    for group, sparsity in masks.group_sparsity().items():
        assert f"{group}: {sparsity:.2%}" in card
    assert json.dumps(result.calibration, sort_keys=True) in card and result.calibration
    assert ("- test/cider: 12.5" in card) == (task == "captioning")
    if task == "captioning":
        assert json.loads((folder / "generation_config.json").read_text())["num_beams"] == module.num_beams


def test_a_module_whose_masks_and_weights_disagree_is_refused_and_nothing_written(tmp_path, vocab):
    module, result = pruned_module("captioning", vocab)
    name = next(n for n in result.masks if n.startswith("text_decoder."))
    with torch.no_grad():
        dict(module.backbone.named_parameters())[name][~result.masks[name]] += 1.0
    with pytest.raises(ValueError, match=re.escape(name) + ".*non-zero"):
        export_transformers(module, tmp_path / "out", masks=result)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_differences_transformers_cannot_express_are_errors(tmp_path, vocab):
    module, result = pruned_module("captioning", vocab)
    head = module.backbone.text_decoder.cls.predictions
    head.decoder.weight = nn.Parameter(head.decoder.weight.detach() + 0.5)  # no longer the word embeddings
    with pytest.raises(ValueError, match="cls.predictions.decoder.weight differs.*ties"):
        export_transformers(module, tmp_path / "a", masks=result)
    module.length_normalisation = "sequence"  # transformers 4.31's beam scores: transformers 5 cannot run them
    with pytest.raises(ValueError, match="length_normalisation='sequence'"):
        export_transformers(module, tmp_path / "d", masks=result)
    xvlm = XVLM.module("retrieval", build_tokenizer(vocab))
    with pytest.raises(ValueError, match="XVLMBackbone has no transformers class"):
        export_transformers(xvlm, tmp_path / "b", masks={})
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "x").write_text("x")
        export_transformers(module, tmp_path / "c", masks=result)


def test_a_lightning_checkpoint_exports_from_the_command_line_with_its_callback_masks(tmp_path, vocab):
    import lightning.pytorch as pl

    from mflightning.cli import cli_main

    module, result = pruned_module("captioning", vocab, meteor=False, max_generated_length=10)
    train, _ = caption_loaders(module.tokenizer)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[MultiFlowCallback(masks=result)], limit_val_batches=0))
    trainer.fit(module, train)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    cli_main(["export", str(tmp_path / "last.ckpt"), "--output_dir", str(tmp_path / "out"), "--format", "transformers"])
    model = BlipForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    processor = BlipProcessor.from_pretrained(tmp_path / "out")
    images, _ = make_images(3, seed=2)
    prompt = processor(text=[module.prompt] * 3, return_tensors="pt")
    ids = model.generate(pixel_values=images, **prompt, **generation_settings(model))
    generated = ids[:, prompt.input_ids.size(1) - 1:]  # after the prompt (generate drops its [SEP])
    captions = [c.strip() for c in processor.batch_decode(generated, skip_special_tokens=True)]
    assert captions == module.eval().generate(images)
    assert PruningResult.load(tmp_path / "out" / "masks.safetensors").method == "multiflow"


@pytest.mark.parametrize("family", ["clip", "siglip", "blip2", "llava"])
def test_transformers_families_export_through_save_pretrained_and_reload_equal(tmp_path, family):
    import test_hf_families as families

    model = families.FAMILIES[family][0]()
    result = prune(model, sparsity=0.5, method="omp")  # the family's preset, recognised
    result.apply(model)
    export = export_transformers(model, tmp_path / "out", masks=result, base_checkpoint="tiny random")
    reloaded, info = type(model).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    batch = families.batches(family, n=1)[0]
    with torch.no_grad():
        ours, theirs = model(**batch), reloaded.eval()(**batch)
    key = "logits" if family in ("blip2", "llava") else "logits_per_image"
    torch.testing.assert_close(theirs[key], ours[key], atol=0, rtol=0)
    params = dict(reloaded.named_parameters())
    masks = PruningResult.load(tmp_path / "out" / "masks.safetensors")
    assert set(masks.masks) == set(result.masks) and masks.preset == family
    assert all((params[n][~m] == 0).all() for n, m in masks.masks.items())
    card = (tmp_path / "out" / "README.md").read_text()
    assert export.masks_sha256 == hashlib.sha256((tmp_path / "out" / "masks.safetensors").read_bytes()).hexdigest()
    assert f"`{export.masks_sha256}`" in card and "tiny random" in card and f"`{type(model).__name__}`" in card
    stored = tensors_checksum(load_file(tmp_path / "out" / "masks.safetensors"))  # recomputed from the tensors
    assert f"`{stored}`" in card and stored.startswith("sha256:")


def test_the_compressed_loader_never_imports_what_a_config_names(tmp_path, monkeypatch):
    """compressed-tensors' registry imports a "module:name" format string; our loader refuses it before that."""
    pytest.importorskip("compressed_tensors")
    from mflightning.export import load_compressed

    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "mfl_config_probe.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('ran').write_text('x')\ndef thing(**kw):\n    return kw\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    (tmp_path / "model").mkdir()
    config = {"quantization_config": {"sparsity_config": {"format": "mfl_config_probe:thing", "targets": []}}}
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mfl_config_probe:thing.*nothing named in a config is imported"):
        load_compressed(tmp_path / "model")
    assert not (tmp_path / "code" / "ran").exists() and "mfl_config_probe" not in sys.modules


def test_a_transformers_folder_exports_from_the_command_line_with_a_mask_file(tmp_path):
    import test_hf_families as families

    from mflightning.cli import cli_main

    model = families.clip_model()
    result = prune(model, sparsity=0.5, method="omp")
    result.apply(model)
    model.save_pretrained(tmp_path / "pruned")
    result.save(tmp_path / "masks.safetensors")
    cli_main(["export", str(tmp_path / "pruned"), "--masks", str(tmp_path / "masks.safetensors"),
              "--output_dir", str(tmp_path / "out"), "--format", "transformers"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "omp (target sparsity 0.5" in card and "`CLIPModel`" in card
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"architectures": ["os.system"]}))
    with pytest.raises(ValueError, match="names no transformers model class"):
        export_transformers(tmp_path / "bad", tmp_path / "out2", masks=result)
