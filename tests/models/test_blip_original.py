"""The authors' original BLIP ``.pth`` checkpoints: renaming, config inference, resizing, errors.

Nothing is downloaded: the files are written here, in the original layout (``visual_encoder.blocks.N.attn.qkv``,
momentum copies, queues, the tied pretraining decoder), from transformers' BLIP classes with random
weights, by a hand-written inverse of the mapping under test.
"""
import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

from mflightning import PruningResult, prune
from mflightning.models.blip import TIED_PARTS, BlipBackbone, tiny_config
from mflightning.models.blip_original import _check_against, convert_original_state, infer_blip_config, summarize_skipped

VOCAB = 40  # [DEC] = 38, [ENC] = 39
LAYERS = 2
PATCH = 8
QUEUE = 6


def config(image_size=32):
    return tiny_config(VOCAB, num_layers=LAYERS, image_size=image_size, patch_size=PATCH)


def randomize_(module, seed):
    """Every parameter random (LayerNorms and biases included), so a swapped name changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def reference_models(cfg, seed=0, tied=False):
    """transformers' BLIP classes with random weights: image encoder, text encoder, decoder, heads."""
    text_cfg = copy.deepcopy(cfg.text_config)
    text_cfg.is_decoder = True
    text_cfg.encoder_hidden_size = cfg.vision_config.hidden_size
    vision = randomize_(BlipVisionModel(cfg.vision_config), seed).eval()
    encoder = randomize_(BlipTextModel(text_cfg, add_pooling_layer=False), seed + 1).eval()
    decoder = randomize_(BlipTextLMHeadModel(text_cfg), seed + 2).eval()
    if tied:  # pretraining: the decoder shares embeddings, cross-attention and FFN with the encoder
        with torch.no_grad():
            decoder.bert.embeddings.load_state_dict(encoder.embeddings.state_dict())
            for enc, dec in zip(encoder.encoder.layer, decoder.bert.encoder.layer):
                for part in TIED_PARTS:
                    getattr(dec, part).load_state_dict(getattr(enc, part).state_dict())
    g = torch.Generator().manual_seed(seed + 3)
    embed, width = cfg.image_text_hidden_size, cfg.text_config.hidden_size
    heads = {
        "vision_proj.weight": torch.randn(embed, cfg.vision_config.hidden_size, generator=g),
        "vision_proj.bias": torch.randn(embed, generator=g),
        "text_proj.weight": torch.randn(embed, width, generator=g),
        "text_proj.bias": torch.randn(embed, generator=g),
        "itm_head.weight": torch.randn(2, width, generator=g),
        "itm_head.bias": torch.randn(2, generator=g),
        "temp": torch.tensor(0.05),
    }
    return vision, encoder, decoder, heads


# The inverse of the mapping under test, written out by hand: transformers names -> the BLIP code's.
VISION_INVERSE = [
    ("embeddings.class_embedding", "cls_token"),
    ("embeddings.position_embedding", "pos_embed"),
    ("embeddings.patch_embedding.", "patch_embed.proj."),
    ("post_layernorm.", "norm."),
]
LAYER_INVERSE = [("self_attn.qkv.", "attn.qkv."), ("self_attn.projection.", "attn.proj."),
                 ("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."), ("mlp.", "mlp.")]


def original_vision_name(name):
    for ours, theirs in VISION_INVERSE:
        if name.startswith(ours):
            return "visual_encoder." + theirs + name[len(ours):]
    _, _, index, rest = name.split(".", 3)  # encoder.layers.N.<rest>
    for ours, theirs in LAYER_INVERSE:
        if rest.startswith(ours):
            return f"visual_encoder.blocks.{index}.{theirs}{rest[len(ours):]}"
    raise AssertionError(f"no original name for {name}")


def original_state(kind, vision, encoder, decoder, heads):
    """A state dict as the BLIP code saves it for ``kind`` (pretraining / retrieval / captioning / vqa)."""
    sd = {original_vision_name(k): v.clone() for k, v in vision.state_dict().items()}
    assert sd["visual_encoder.blocks.0.attn.qkv.weight"].shape[0] == 3 * sd["visual_encoder.cls_token"].shape[-1]
    if kind != "captioning":
        sd |= {f"text_encoder.{k}": v.clone() for k, v in encoder.state_dict().items()}
        sd["text_encoder.embeddings.position_ids"] = torch.arange(encoder.config.max_position_embeddings)[None]
    if kind != "retrieval":
        # Every name, aliases included: cls.predictions.decoder.weight (= word embeddings), decoder.bias (= bias).
        sd |= {f"text_decoder.{k}": v.clone() for k, v in decoder.state_dict().items()}
        sd["text_decoder.bert.embeddings.position_ids"] = torch.arange(encoder.config.max_position_embeddings)[None]
    if kind in ("pretraining", "retrieval"):
        sd |= {k: v.clone() for k, v in heads.items()}
        for name in [k for k in sd if k.split(".")[0] in ("visual_encoder", "text_encoder", "vision_proj", "text_proj")]:
            top, _, rest = name.partition(".")
            sd[f"{top}_m.{rest}"] = sd[name] + 0.01  # momentum copies
        embed = heads["vision_proj.weight"].shape[0]
        sd["image_queue"] = torch.randn(embed, QUEUE)
        sd["text_queue"] = torch.randn(embed, QUEUE)
        if kind == "pretraining":
            sd["queue_ptr"] = torch.zeros(1, dtype=torch.long)
        else:
            sd["idx_queue"] = torch.full((1, QUEUE), -100)
            sd["ptr_queue"] = torch.zeros(1, dtype=torch.long)
    return sd


def write(path, sd):
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "config": {"image_size": 32}, "epoch": 3}, path)
    return path


def inputs(n=2, length=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 38, (n, length), generator=g)
    att = torch.ones(n, length, dtype=torch.long)
    att[1, 4:] = 0
    return torch.randn(n, 3, size, size, generator=g), ids, att


@pytest.fixture
def pretraining(tmp_path):
    refs = reference_models(config(), tied=True)
    return write(tmp_path / "model_base_14M.pth", original_state("pretraining", *refs)), refs


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("tie", [None, False, True])
def test_pretraining_checkpoint_matches_transformers_blip(pretraining, tie):
    path, (vision, encoder, decoder, heads) = pretraining
    model = BlipBackbone.from_pretrained(path, config=config(), tie_decoder=tie).eval()
    # The file's decoder is tied to the encoder: None keeps that layout.
    assert model.decoder_tied == (tie is not False)
    if model.decoder_tied:
        dec, enc = model.text_decoder.bert.encoder.layer[1], model.text_encoder.encoder.layer[1]
        assert dec.crossattention.self.query.weight is enc.crossattention.self.query.weight
        assert dec.output.LayerNorm.bias is enc.output.LayerNorm.bias
    image, ids, att = inputs()
    with torch.no_grad():
        image_embeds = model.encode_image(image)
        torch.testing.assert_close(image_embeds, vision(pixel_values=image).last_hidden_state, rtol=0, atol=0)
        grounded = model.encode_grounded(ids, att, image_embeds)
        mask = torch.ones(image_embeds.shape[:2], dtype=torch.long)
        expected = encoder(input_ids=ids, attention_mask=att, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=mask).last_hidden_state
        torch.testing.assert_close(grounded, expected, rtol=0, atol=0)
        torch.testing.assert_close(model.encode_text(ids, att),
                                   encoder(input_ids=ids, attention_mask=att).last_hidden_state, rtol=0, atol=0)
        logits = decoder(input_ids=ids, attention_mask=att, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=mask).logits
        torch.testing.assert_close(model.decode(ids, att, image_embeds), logits, rtol=0, atol=0)
    for name, value in heads.items():
        assert torch.equal(model.state_dict()[name], value), name
    # LM head stays tied to the decoder's word embeddings.
    dec = model.text_decoder
    assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight


def test_skipped_training_tensors_are_listed_in_one_log_line(pretraining, caplog):
    path, _ = pretraining
    raw = torch.load(path, weights_only=True)["model"]
    momentum = {top: sum(k.startswith(top + ".") for k in raw)
                for top in ("visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m")}
    with caplog.at_level(logging.INFO, logger="mflightning.models.blip_original"):
        BlipBackbone.from_pretrained(path, config=config())
    lines = [r.getMessage() for r in caplog.records if "training-only" in r.getMessage()]
    assert len(lines) == 1
    total = sum(momentum.values()) + 3  # image_queue, text_queue, queue_ptr
    assert f"skipped {total} training-only tensors" in lines[0]
    for top, n in momentum.items():
        assert f"{top}.* ({n})" in lines[0]
    for queue in ("image_queue", "text_queue", "queue_ptr"):
        assert queue in lines[0]
    assert str(path) in lines[0] and "pretraining" in lines[0]
    assert summarize_skipped(["idx_queue", "a_m.x", "a_m.y"]) == "skipped 3 training-only tensors: a_m.* (2), idx_queue"


def test_bare_state_dict_file_loads(tmp_path, pretraining):
    path, _ = pretraining
    bare = tmp_path / "bare.bin"
    torch.save(torch.load(path, weights_only=True)["model"], bare)
    a = BlipBackbone.from_pretrained(path, config=config()).state_dict()
    b = BlipBackbone.from_pretrained(bare, config=config()).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- checkpoint types
def test_retrieval_checkpoint_needs_a_decoder_source_or_allow_missing(tmp_path):
    vision, encoder, _, heads = refs = reference_models(config(), seed=10)
    path = write(tmp_path / "model_base_retrieval_coco.pth", original_state("retrieval", *refs))
    with pytest.raises(ValueError, match=r"text_decoder.*retrieval fine-tune.*decoder_from"):
        BlipBackbone.from_pretrained(path, config=config())
    partial = BlipBackbone.from_pretrained(path, config=config(), allow_missing=("text_decoder",))
    assert torch.equal(partial.itm_head.weight, heads["itm_head.weight"])
    assert torch.equal(partial.temp, heads["temp"])
    assert not partial.decoder_tied

    captioner = reference_models(config(), seed=20)
    cap_path = write(tmp_path / "model_base_caption.pth", original_state("captioning", *captioner))
    model = BlipBackbone.from_pretrained(path, config=config(), decoder_from=cap_path)
    mine = model.state_dict()
    for name, value in captioner[2].state_dict().items():
        assert torch.equal(mine[f"text_decoder.{name}"], value), name
    # The retrieval file's image encoder wins over the captioning one's.
    assert torch.equal(mine["vision_model.post_layernorm.weight"], vision.post_layernorm.weight)
    assert torch.equal(mine["text_encoder.encoder.layer.1.output.dense.weight"],
                       encoder.encoder.layer[1].output.dense.weight)
    # a decoder_from= file without a decoder is an error saying what kind of file it is
    with pytest.raises(ValueError, match=r"without text_decoder.*\(retrieval fine-tune\)"):
        BlipBackbone.from_pretrained(path, config=config(), decoder_from=path)


def test_captioning_and_vqa_checkpoints_lack_parts_explicitly(tmp_path, caplog):
    vision, encoder, decoder, _ = refs = reference_models(config(), seed=30)
    cap = write(tmp_path / "model_base_caption_capfilt_large.pth", original_state("captioning", *refs))
    with pytest.raises(ValueError, match=r"text_encoder.*captioning fine-tune"):
        BlipBackbone.from_pretrained(cap, config=config())
    parts = ("text_encoder", "vision_proj", "text_proj", "itm_head")
    with caplog.at_level(logging.INFO):
        model = BlipBackbone.from_pretrained(cap, config=config(), allow_missing=parts).eval()
    assert any("no ITC temperature" in r.getMessage() for r in caplog.records)
    image, ids, att = inputs()
    with torch.no_grad():
        embeds = model.encode_image(image)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        expected = decoder(input_ids=ids, attention_mask=att, encoder_hidden_states=embeds,
                           encoder_attention_mask=mask).logits
        torch.testing.assert_close(model.decode(ids, att, embeds), expected, rtol=0, atol=0)

    vqa = write(tmp_path / "model_base_vqa_capfilt_large.pth", original_state("vqa", *refs))
    with pytest.raises(ValueError, match=r"itm_head.*VQA fine-tune"):
        BlipBackbone.from_pretrained(vqa, config=config())
    model = BlipBackbone.from_pretrained(vqa, config=config(), allow_missing=("vision_proj", "text_proj", "itm_head"))
    assert not model.decoder_tied  # separate encoder and decoder in the file
    mine = model.state_dict()
    for name, value in decoder.state_dict().items():
        assert torch.equal(mine[f"text_decoder.{name}"], value), name
    for name, value in encoder.state_dict().items():
        assert torch.equal(mine[f"text_encoder.{name}"], value), name


# ----------------------------------------------------------------------------- errors
def test_unknown_missing_and_misshaped_tensors_are_errors_naming_them(tmp_path):
    refs = reference_models(config(), tied=True)
    base = original_state("pretraining", *refs)

    bad = dict(base, **{"visual_encoder.head.weight": torch.zeros(3, 32)})
    path = write(tmp_path / "unknown.pth", bad)
    with pytest.raises(ValueError, match=r"unknown\.pth.*visual_encoder\.head\.weight"):
        BlipBackbone.from_pretrained(path, config=config())
    bad = dict(base, **{"text_encoder.pooler.dense.weight": torch.zeros(32, 32)})
    with pytest.raises(ValueError, match=r"pooler.*\.pth.*|\.pth.*pooler"):
        BlipBackbone.from_pretrained(write(tmp_path / "pooler.pth", bad), config=config())
    bad = dict(base, **{"optimizer_state": torch.zeros(1)})
    with pytest.raises(ValueError, match="optimizer_state"):
        BlipBackbone.from_pretrained(write(tmp_path / "extra.pth", bad), config=config())

    bad = dict(base)
    del bad["visual_encoder.blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing\.pth.*vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        BlipBackbone.from_pretrained(write(tmp_path / "missing.pth", bad), config=config())

    bad = dict(base, **{"visual_encoder.blocks.0.attn.qkv.weight": torch.zeros(64, 32)})
    with pytest.raises(ValueError, match=r"shape\.pth.*visual_encoder\.blocks\.0\.attn\.qkv\.weight.*\(64, 32\).*\(96, 32\)"):
        BlipBackbone.from_pretrained(write(tmp_path / "shape.pth", bad), config=config())

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        BlipBackbone.from_pretrained(tmp_path / "nope.pth", config=config())
    # Tiny widths: heads cannot be inferred, the error says to pass config=.
    with pytest.raises(ValueError, match=r"attention heads.*width 32.*config="):
        BlipBackbone.from_pretrained(write(tmp_path / "tiny.pth", base))


def test_files_torch_refuses_to_load_safely_are_a_clear_error(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {}, "args": logging.Formatter()}, path)  # an arbitrary object: not weights_only
    with pytest.raises(ValueError, match=r"pickled\.pth.*weights_only"):
        BlipBackbone.from_pretrained(path, config=config())


# ----------------------------------------------------------------------------- config inference
def fake_original(vision_width, vision_depth, image_size, patch=16, text_width=768, text_depth=12, vocab=30524,
                  decoder=True):
    """Meta tensors with the shapes of an original pretraining checkpoint (no memory)."""
    def t(*shape):
        return torch.empty(shape, device="meta")

    sd = {"visual_encoder.cls_token": t(1, 1, vision_width),
          "visual_encoder.pos_embed": t(1, 1 + (image_size // patch) ** 2, vision_width),
          "visual_encoder.patch_embed.proj.weight": t(vision_width, 3, patch, patch),
          "visual_encoder.patch_embed.proj.bias": t(vision_width),
          "visual_encoder.norm.weight": t(vision_width), "visual_encoder.norm.bias": t(vision_width)}
    for i in range(vision_depth):
        b = f"visual_encoder.blocks.{i}."
        sd |= {b + "norm1.weight": t(vision_width), b + "norm1.bias": t(vision_width),
               b + "attn.qkv.weight": t(3 * vision_width, vision_width), b + "attn.qkv.bias": t(3 * vision_width),
               b + "attn.proj.weight": t(vision_width, vision_width), b + "attn.proj.bias": t(vision_width),
               b + "norm2.weight": t(vision_width), b + "norm2.bias": t(vision_width),
               b + "mlp.fc1.weight": t(4 * vision_width, vision_width), b + "mlp.fc1.bias": t(4 * vision_width),
               b + "mlp.fc2.weight": t(vision_width, 4 * vision_width), b + "mlp.fc2.bias": t(vision_width)}
    towers = ["text_encoder."] + (["text_decoder.bert."] if decoder else [])
    for tower in towers:
        e = tower + "embeddings."
        sd |= {e + "word_embeddings.weight": t(vocab, text_width), e + "position_embeddings.weight": t(512, text_width),
               e + "LayerNorm.weight": t(text_width), e + "LayerNorm.bias": t(text_width),
               e + "position_ids": torch.empty(1, 512, dtype=torch.long, device="meta")}
        for i in range(text_depth):
            L = f"{tower}encoder.layer.{i}."
            for attn, kv_width in (("attention", text_width), ("crossattention", vision_width)):
                sd |= {f"{L}{attn}.self.query.weight": t(text_width, text_width),
                       f"{L}{attn}.self.key.weight": t(text_width, kv_width),
                       f"{L}{attn}.self.value.weight": t(text_width, kv_width),
                       f"{L}{attn}.output.dense.weight": t(text_width, text_width),
                       f"{L}{attn}.output.LayerNorm.weight": t(text_width)}
                sd |= {f"{L}{attn}.{n}.bias": t(text_width) for n in ("self.query", "self.key", "self.value",
                                                                       "output.dense", "output.LayerNorm")}
            sd |= {L + "intermediate.dense.weight": t(4 * text_width, text_width),
                   L + "intermediate.dense.bias": t(4 * text_width),
                   L + "output.dense.weight": t(text_width, 4 * text_width), L + "output.dense.bias": t(text_width),
                   L + "output.LayerNorm.weight": t(text_width), L + "output.LayerNorm.bias": t(text_width)}
    if decoder:
        p = "text_decoder.cls.predictions."
        sd |= {p + "bias": t(vocab), p + "transform.dense.weight": t(text_width, text_width),
               p + "transform.dense.bias": t(text_width), p + "transform.LayerNorm.weight": t(text_width),
               p + "transform.LayerNorm.bias": t(text_width), p + "decoder.weight": t(vocab, text_width),
               p + "decoder.bias": t(vocab)}
    sd |= {"vision_proj.weight": t(256, vision_width), "vision_proj.bias": t(256),
           "text_proj.weight": t(256, text_width), "text_proj.bias": t(256),
           "itm_head.weight": t(2, text_width), "itm_head.bias": t(2), "temp": t(),
           "visual_encoder_m.cls_token": t(1, 1, vision_width), "image_queue": t(256, 57600),
           "text_queue": t(256, 57600), "queue_ptr": torch.empty(1, dtype=torch.long, device="meta")}
    return sd


@pytest.mark.parametrize("size, width, depth, heads, image", [("base", 768, 12, 12, 224), ("large", 1024, 24, 16, 384)])
def test_config_inference_for_the_published_sizes(size, width, depth, heads, image):
    sd = fake_original(width, depth, image)
    cfg = infer_blip_config(sd, f"model_{size}.pth")
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (width, depth, heads, 4 * width)
    assert (v.image_size, v.patch_size, v.layer_norm_eps) == (image, 16, 1e-6)
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (30524, 768, 12, 12, 3072)
    assert (t.encoder_hidden_size, t.max_position_embeddings) == (width, 512)
    assert (t.bos_token_id, cfg.enc_token_id, t.pad_token_id, t.sep_token_id) == (30522, 30523, 0, 102)
    assert cfg.image_text_hidden_size == 256
    # The whole file maps onto a backbone built from that config (names and shapes; on meta, no memory).
    with torch.device("meta"):
        model = BlipBackbone(cfg)
    mapped, origin, skipped = convert_original_state(sd, "fake")
    assert set(skipped) == {"visual_encoder_m.cls_token", "image_queue", "text_queue", "queue_ptr"}
    _check_against(model, mapped, origin, "fake", inferred=True)  # every tensor has a same-shaped model tensor
    own = model.state_dict()  # (meta tensors share no storage, so compare names, tied aliases included)
    assert set(own) == {k for k in mapped if not k.endswith("position_ids")}  # ... and none is missing


def test_config_inference_refuses_what_it_cannot_decide():
    with pytest.raises(ValueError, match=r"heads.*width 640.*config="):
        infer_blip_config(fake_original(640, 2, 224, text_depth=1), "odd.pth")
    with pytest.raises(ValueError, match=r"vocabulary of 1000.*config="):
        infer_blip_config(fake_original(768, 2, 224, text_depth=1, vocab=1000), "vocab.pth")
    sd = fake_original(768, 2, 224, text_depth=1)
    del sd["visual_encoder.blocks.1.norm1.weight"], sd["visual_encoder.blocks.1.norm1.bias"]
    infer_blip_config(sd, "ok.pth")  # block 1 still has other tensors: the depth is 2 (the load reports the gap)
    sd = {k: v for k, v in sd.items() if not k.startswith("visual_encoder.blocks.0.")}
    with pytest.raises(ValueError, match=r"depth.*\[1\]"):
        infer_blip_config(sd, "gap.pth")


# ----------------------------------------------------------------------------- image size
def test_loading_at_another_image_size_resizes_position_embeddings(pretraining):
    path, (vision, *_ ) = pretraining
    low = BlipBackbone.from_pretrained(path, config=config())          # 32 px / 8: 4x4 grid
    high = BlipBackbone.from_pretrained(path, config=config(), image_size=48)  # 6x6 grid
    assert high.image_size == 48
    pos = vision.embeddings.position_embedding.detach()
    got = high.vision_model.embeddings.position_embedding.detach()
    assert got.shape == (1, 1 + 36, 32)
    assert torch.equal(got[:, :1], pos[:, :1])  # CLS kept
    grid = pos[0, 1:].reshape(4, 4, 32).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(36, 32)
    torch.testing.assert_close(got[0, 1:], expected)
    # Everything else is the same tensor.
    a, b = low.state_dict(), high.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("position_embedding"))
    # config= with another image size resizes the same way.
    same = BlipBackbone.from_pretrained(path, config=config(image_size=48))
    assert torch.equal(same.vision_model.embeddings.position_embedding, high.vision_model.embeddings.position_embedding)
    assert math.isqrt(high.encode_image(torch.randn(1, 3, 48, 48)).shape[1] - 1) == 6


def test_masks_pruned_at_low_resolution_apply_at_high_resolution(pretraining, tmp_path):
    path, _ = pretraining
    low = BlipBackbone.from_pretrained(path, config=config(), tie_decoder=True)
    image, ids, att = inputs(n=3, size=32)
    ids[:, 0] = 2
    result = prune(low, sparsity=0.5, calibration=[{"image": image, "input_ids": ids, "attention_mask": att}])
    result.save(tmp_path / "masks.safetensors")

    high = BlipBackbone.from_pretrained(path, config=config(), image_size=48, tie_decoder=False)
    masks = PruningResult.load(tmp_path / "masks.safetensors").apply(high)
    params = dict(high.named_parameters())
    assert any(n.startswith("vision_model.") for n in masks) and any(n.startswith("text_decoder.") for n in masks)
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name
    qkv = "vision_model.encoder.layers.0.self_attn.qkv.weight"
    assert torch.equal(masks[qkv], result.masks[qkv])
    image48, ids, att = inputs(n=2, size=48)
    out = high(image=image48, input_ids=ids, attention_mask=att)
    assert torch.isfinite(out["decoder_logits"]).all()


def test_image_size_and_config_arguments_for_transformers_format_directories(tmp_path):
    torch.manual_seed(0)
    model = BlipBackbone(config())
    model.save_pretrained(tmp_path / "own")
    high = BlipBackbone.from_pretrained(tmp_path / "own", image_size=48)
    assert high.image_size == 48 and high.vision_model.embeddings.position_embedding.shape == (1, 37, 32)
    pos = model.vision_model.embeddings.position_embedding
    assert torch.equal(high.vision_model.embeddings.position_embedding[:, 0], pos[:, 0])
    with pytest.raises(ValueError, match="config= applies to original BLIP .pth files only"):
        BlipBackbone.from_pretrained(tmp_path / "own", config=config())


class _Tokenizer:
    """The three things `check_tokenizer` reads, for the tiny vocabulary ([DEC] 38, [ENC] 39, [PAD] 0)."""

    pad_token_id = 0

    def __len__(self):
        return VOCAB

    def convert_tokens_to_ids(self, token):
        return {"[DEC]": 38, "[ENC]": 39}[token]


def test_a_checkpoint_spec_dict_loads_the_file_at_the_task_resolution(pretraining):
    """What a recipe's `backbone: {checkpoint: model_base_14M.pth, image_size: 384}` does (here 32 -> 48 px)."""
    path, _ = pretraining
    direct = BlipBackbone.from_pretrained(path, config=config(), image_size=48, tie_decoder=False)
    spec = BlipBackbone.from_spec({"checkpoint": str(path), "image_size": 48, "config": config().to_dict()},
                                  _Tokenizer())
    assert spec.image_size == 48 and not spec.decoder_tied  # task modules train untied copies
    a, b = direct.state_dict(), spec.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"unknown keys \['strict'\] in the BLIP checkpoint spec"):
        BlipBackbone.from_spec({"checkpoint": str(path), "strict": False}, _Tokenizer())


def test_text_dropout_is_the_authors_med_config_when_the_config_is_inferred():
    """configs/blip/med_config.json: hidden and attention dropout 0.1 in every text encoder/decoder layer;
    the original ViT has none (drop_rate=attn_drop_rate=0)."""
    cfg = infer_blip_config(fake_original(768, 2, 224, text_depth=2), "model_base.pth")
    with torch.device("meta"):
        model = BlipBackbone(cfg)
    text = [m.p for part in (model.text_encoder, model.text_decoder) for m in part.modules() if isinstance(m, torch.nn.Dropout)]
    # per layer: self-attention probs + output, cross-attention probs + output, FFN output; plus the embeddings
    assert len(text) == 2 * (1 + 2 * 5) and set(text) == {0.1}
    vision = [m.p for m in model.vision_model.modules() if isinstance(m, torch.nn.Dropout)]
    assert set(vision) <= {0.0}
    assert model.config.vision_config.drop_path_rate == 0.0  # ... and no stochastic depth unless asked for (VQA)


def test_the_checkpoint_spec_sets_the_vits_drop_path(pretraining):
    """`backbone: {checkpoint: ..., drop_path_rate: 0.1}` (the VQA recipes): BLIP's create_vit(drop_path_rate=0.1)."""
    path, _ = pretraining
    spec = BlipBackbone.from_spec({"checkpoint": str(path), "config": config().to_dict(), "drop_path_rate": 0.1},
                                  _Tokenizer())
    assert [layer.mlp._mfl_drop_path for layer in spec.vision_model.encoder.layers] == [0.0, pytest.approx(0.1)]
    assert spec.config.vision_config.drop_path_rate == pytest.approx(0.1)


def test_retrieval_starts_its_momentum_encoders_and_queue_from_the_pretraining_file(pretraining, tmp_path):
    """The authors' load_checkpoint fills BLIPRetrieval's visual_encoder_m/text_encoder_m/*_proj_m and its
    image/text queues from model_base*.pth; their idx_queue stays -100 (no queued feature is a positive)."""
    from mflightning.tasks import RetrievalModule

    path, _ = pretraining
    original = torch.load(path, weights_only=True)["model"]
    spec = {"checkpoint": str(path), "config": config().to_dict(), "image_size": 48}
    module = RetrievalModule(backbone=spec, tokenizer=_Tokenizer(), queue_size=QUEUE, momentum_from_checkpoint=True)
    m, online = module.backbone_m, module.backbone
    assert torch.equal(m.text_encoder.encoder.layer[1].crossattention.self.key.weight,
                       original["text_encoder_m.encoder.layer.1.crossattention.self.key.weight"])
    assert torch.equal(m.vision_model.encoder.layers[0].self_attn.qkv.weight,
                       original["visual_encoder_m.blocks.0.attn.qkv.weight"])
    assert torch.equal(m.vision_proj.weight, original["vision_proj_m.weight"])
    assert torch.allclose(m.text_proj.weight, online.text_proj.weight + 0.01)  # not the online copy
    # 32 -> 48 px: the file's momentum position table (online + 0.01) resized as the online one (bicubic weights
    # sum to 1, so the offset stays)
    assert m.vision_model.embeddings.position_embedding.shape == (1, 1 + 36, 32)
    assert torch.allclose(m.vision_model.embeddings.position_embedding,
                          online.vision_model.embeddings.position_embedding + 0.01, atol=1e-5)
    q = module.queue
    assert torch.equal(q.image_feat, original["image_queue"].t()) and torch.equal(q.text_feat, original["text_queue"].t())
    assert q.image_idx.tolist() == [-1] * QUEUE and int(q.ptr) == 0
    with pytest.raises(ValueError, match=r"image queue of shape \(6, 16\).*size 8.*queue_size=6"):
        RetrievalModule(backbone=spec, tokenizer=_Tokenizer(), queue_size=8, momentum_from_checkpoint=True)
    vqa = {k: v for k, v in original.items() if not k.endswith("_queue") and "_m." not in k}
    write(tmp_path / "vqa.pth", vqa)
    with pytest.raises(ValueError, match=r"vqa.pth: a .*checkpoint without momentum encoders"):
        RetrievalModule(backbone={**spec, "checkpoint": str(tmp_path / "vqa.pth")}, tokenizer=_Tokenizer(),
                        queue_size=QUEUE, momentum_from_checkpoint=True)
    with pytest.raises(ValueError, match=r"needs momentum encoders"):
        RetrievalModule(backbone=spec, tokenizer=_Tokenizer(), momentum=None, alpha=0.0, momentum_from_checkpoint=True)


# ----------------------------------------------------------------------------- files the MULTIFLOW code writes
@pytest.mark.parametrize("kind", ["pretraining", "vqa"])
def test_multiflow_code_files_keep_the_lm_head_bias_only_as_decoder_bias(tmp_path, kind):
    """The MULTIFLOW code's med.py saves the LM-head bias only as cls.predictions.decoder.bias: it loads."""
    refs = reference_models(config(), seed=40, tied=kind == "pretraining")
    state = original_state(kind, *refs)
    bias = state.pop("text_decoder.cls.predictions.bias")
    assert torch.equal(state["text_decoder.cls.predictions.decoder.bias"], bias) and bias.abs().sum() > 0
    allow = ("vision_proj", "text_proj", "itm_head") if kind == "vqa" else ()
    model = BlipBackbone.from_pretrained(write(tmp_path / f"{kind}.pth", state), config=config(), allow_missing=allow)
    head = model.text_decoder.cls.predictions
    assert torch.equal(head.bias, bias) and head.decoder.bias is head.bias
    # the upstream BLIP layout (both names) loads the same; two different values are an error naming them
    state["text_decoder.cls.predictions.bias"] = bias
    again = BlipBackbone.from_pretrained(write(tmp_path / "both.pth", state), config=config(), allow_missing=allow)
    assert torch.equal(again.text_decoder.cls.predictions.bias, bias)
    state["text_decoder.cls.predictions.bias"] = bias + 1
    with pytest.raises(ValueError, match=r"conflict\.pth.*two names of one tied tensor.*cls\.predictions\.decoder\.bias"):
        BlipBackbone.from_pretrained(write(tmp_path / "conflict.pth", state), config=config(), allow_missing=allow)
