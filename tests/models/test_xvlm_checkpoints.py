"""XVLM_CLIP in the authors' layout: CLIP vision encoder names and outputs, the authors' checkpoint
(pretraining and fine-tuning files), resizing at load, errors, and per-projection masks."""
import json
import logging

import pytest
import torch
from transformers import CLIPVisionModel

from mflightning import PruningResult, prune
from mflightning.models.state import resize_position_embeddings
from mflightning.models.xvlm import XVLMBackbone, tiny_config
from mflightning.models.xvlm_checkpoints import convert_authors_state, infer_authors_config
from mflightning.models.xvlm_config import clip_vision_config
from mflightning.models.xvlm_layers import clip_state_to_xvlm

VOCAB = 40
HEADS = {"num_attention_heads": 2, "vision_heads": 2}  # tiny widths: the heads cannot be inferred


def batch(n=3, length=7, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, length), generator=g)
    ids[:, 0] = 2
    att = torch.ones(n, length, dtype=torch.long)
    att[1, 4:] = 0
    return {"image": torch.randn(n, 3, size, size, generator=g), "input_ids": ids, "attention_mask": att}


def source_model(**overrides):
    torch.manual_seed(0)
    model = XVLMBackbone(tiny_config(VOCAB, num_text_layers=2, num_fusion_layers=2, **overrides)).eval()
    with torch.no_grad():  # make the (tiny-initialised) class token and norms matter
        model.vision_encoder.class_embedding.normal_()
        model.vision_encoder.post_layernorm.weight.uniform_(0.5, 1.5)
        model.temp.fill_(0.05)
    return model


def authors_state(model, bert_level=True, training_only=True, mlm_head=True):
    """``model`` written by hand in the XVLM_CLIP authors' layout (the inverse of the loader's mapping)."""
    level = "bert." if bert_level else ""
    text_layers = model.config.num_text_layers
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("fusion_encoder.layer."):
            index = int(key.split(".")[2])
            assert index >= text_layers  # global numbering: fusion layers follow the text layers
            key = f"text_encoder.{level}encoder.layer." + key[len("fusion_encoder.layer."):]
        elif key.startswith(("text_encoder.encoder.", "text_encoder.embeddings.")):
            key = f"text_encoder.{level}" + key[len("text_encoder."):]
        elif key.startswith("text_encoder.cls.") and not mlm_head:
            continue
        out[key] = value.clone()
    positions = out["vision_encoder.pos_embed.weight"].size(0)
    out["vision_encoder.position_ids"] = torch.arange(positions).expand(1, -1)
    out[f"text_encoder.{level}embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]
    if training_only:
        for key in [k for k in out if k.startswith(("vision_encoder.", "vision_proj.", "text_proj."))]:
            head, rest = key.split(".", 1)
            out[f"{head}_m.{rest}"] = out[key].clone()
        out["image_queue"] = torch.randn(16, 64)
        out["text_queue"] = torch.randn(16, 64)
        out["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return out


def save_authors(tmp_path, state, name="xvlm_clip_4m.pth"):
    path = tmp_path / name
    torch.save({"model": state, "config": {"image_res": 32}, "epoch": 3}, path)
    return path


def outputs(model, size=32):
    b = batch(size=size)
    with torch.no_grad():
        out = model(**b)
        out["itm"] = model.match_logits(b["input_ids"], b["attention_mask"], out["image_embeds"])
        out["mlm"] = model.mlm_logits(out["fusion_states"])
        out["image_features"] = model.image_features(out["image_embeds"])
    return out


# ------------------------------------------------------------------------------------ vision encoder
def test_vision_encoder_has_the_authors_names_and_equals_transformers_clip_with_post_norm_on_all_tokens():
    config = tiny_config(VOCAB, vision_layers=2)
    torch.manual_seed(1)
    clip = CLIPVisionModel(clip_vision_config(config)).eval()
    model = XVLMBackbone(config).eval()
    model.vision_encoder.load_state_dict(clip_state_to_xvlm(clip.state_dict()), strict=True)
    names = set(model.vision_encoder.state_dict())
    assert {"class_embedding", "patch_embed.weight", "pos_embed.weight", "pre_layrnorm.weight", "post_layernorm.bias",
            "encoder.layers.1.self_attn.q_proj.weight", "encoder.layers.1.self_attn.k_proj.bias",
            "encoder.layers.1.self_attn.v_proj.weight", "encoder.layers.1.self_attn.out_proj.weight",
            "encoder.layers.1.layer_norm1.weight", "encoder.layers.1.mlp.fc1.weight", "encoder.layers.1.mlp.fc2.bias",
            "encoder.layers.1.layer_norm2.weight"} <= names
    assert not any("position_ids" in n for n in names)
    assert model.vision_encoder.config.hidden_act == "quick_gelu"
    assert model.vision_encoder.post_layernorm.eps == 1e-5
    for size in (32, 48):  # 48 px: both interpolate the 2x2 position grid to 3x3 (bicubic, CLS kept)
        image = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ours = model.encode_image(image)
            theirs = clip(pixel_values=image, interpolate_pos_encoding=size != 32)
        # XVLM normalises every token; transformers' post_layernorm covers only the pooled [CLS] token.
        assert torch.allclose(ours, clip.post_layernorm(theirs.last_hidden_state), atol=1e-5), size
        assert torch.allclose(ours[:, 0], theirs.pooler_output, atol=1e-5), size
        assert not torch.allclose(ours[:, 1:], theirs.last_hidden_state[:, 1:], atol=1e-3)


def test_clip_vision_model_option_loads_a_local_transformers_clip_at_another_size(tmp_path):
    config = tiny_config(VOCAB)
    torch.manual_seed(2)
    clip = CLIPVisionModel(clip_vision_config(config))
    clip.save_pretrained(tmp_path / "clip")
    model = XVLMBackbone(tiny_config(VOCAB, image_size=48, clip_vision_model=str(tmp_path / "clip")))
    expected = clip_state_to_xvlm(clip.state_dict())
    layer = "encoder.layers.0.self_attn.v_proj.weight"
    assert torch.equal(model.vision_encoder.state_dict()[layer], expected[layer])
    assert torch.equal(model.vision_encoder.pos_embed.weight,
                       resize_position_embeddings(expected["pos_embed.weight"], 9))  # 32 px -> 48 px table
    model.save_pretrained(tmp_path / "saved")  # the saved config no longer points at the CLIP model
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["clip_vision_model"] is None
    with pytest.raises(ValueError, match=r"does not fit the XVLM config.*num_attention_heads: 2 vs 4"):
        XVLMBackbone(tiny_config(VOCAB, vision_heads=4, clip_vision_model=str(tmp_path / "clip")))


def test_layout_options_are_checked_and_old_timm_configs_still_load(tmp_path):
    with pytest.raises(ValueError, match=r"\['vision_model'\] belong to vision_layout='timm'"):
        XVLMBackbone(tiny_config(VOCAB, vision_model="vit_base_patch16_clip_224"))
    with pytest.raises(ValueError, match=r"\['vision_width'\] belong to vision_layout='clip'"):
        XVLMBackbone(tiny_config(VOCAB, vision_layout="timm", vision_width=64))
    with pytest.raises(ValueError, match="vision_layout must be one of"):
        XVLMBackbone(tiny_config(VOCAB, vision_layout="swin"))
    # A save_pretrained folder written before the CLIP layout (no vision_layout key) holds a timm ViT.
    old = XVLMBackbone(tiny_config(VOCAB, vision_layout="timm"))
    old.save_pretrained(tmp_path / "old")
    raw = json.loads((tmp_path / "old" / "config.json").read_text())
    del raw["vision_layout"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(raw))
    loaded = XVLMBackbone.from_pretrained(tmp_path / "old")
    assert loaded.config.vision_layout == "timm"
    assert torch.equal(loaded.vision_encoder.blocks[0].attn.qkv.weight, old.vision_encoder.blocks[0].attn.qkv.weight)


# ------------------------------------------------------------------------------------ the authors' checkpoint
def test_authors_pretraining_checkpoint_loads_with_the_source_outputs_and_one_skip_line(tmp_path, caplog):
    source = source_model()
    path = save_authors(tmp_path, authors_state(source))
    with caplog.at_level(logging.INFO, logger="mflightning.models.xvlm_checkpoints"):
        loaded = XVLMBackbone.from_pretrained(path, config=HEADS).eval()
    records = [r for r in caplog.records if r.name == "mflightning.models.xvlm_checkpoints"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    line = records[0].getMessage()
    assert "xvlm_clip_4m.pth" in line
    for skipped in ("vision_encoder_m.* (", "vision_proj_m.* (2)", "text_proj_m.* (2)", "image_queue", "text_queue",
                    "queue_ptr", "vision_encoder.position_ids", "text_encoder.bert.embeddings.position_ids"):
        assert skipped in line, skipped
    # Config read off the shapes: layers split where cross-attention starts, sizes, box head.
    inferred, wanted = loaded.config.to_dict(), source.config.to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_text_layers", "num_fusion_layers",
                "max_position_embeddings", "vision_width", "vision_layers", "vision_intermediate_size",
                "patch_size", "image_size", "embed_dim", "bbox_head"):
        assert inferred[key] == wanted[key], key
    assert set(loaded.fusion_encoder.layer) == {"2", "3"} and set(loaded.text_encoder.encoder.layer) == {"0", "1"}
    mine, theirs = source.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert loaded.text_encoder.cls.predictions.decoder.weight is loaded.text_encoder.embeddings.word_embeddings.weight
    a, b = outputs(source), outputs(loaded)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_authors_finetuning_file_without_bert_level_and_mlm_head(tmp_path):
    source = source_model(bbox_head=False)
    path = save_authors(tmp_path, authors_state(source, bert_level=False, training_only=False, mlm_head=False),
                        name="retrieval_coco.pth")
    with pytest.raises(ValueError, match=r"retrieval_coco\.pth.*missing from the file: "
                                         r"\[text_encoder\.cls\.predictions\.bias, text_encoder\.cls\.predictions"
                                         r"\.transform\.LayerNorm\.bias"):
        XVLMBackbone.from_pretrained(path, config=HEADS)
    loaded = XVLMBackbone.from_pretrained(path, config=HEADS, strict=False).eval()
    assert loaded.bbox_head is None and loaded.config.bbox_head is False
    a, b = outputs(source), outputs(loaded)
    for key in ("image_embeds", "text_states", "fusion_states", "itm", "image_features"):
        assert torch.equal(a[key], b[key]), key


def test_heads_come_from_the_widths_or_config(tmp_path):
    path = save_authors(tmp_path, authors_state(source_model()))
    with pytest.raises(ValueError, match=r"xvlm_clip_4m\.pth: cannot tell the number of attention heads.*"
                                         r"pass config=\{'num_attention_heads': \.\.\., 'vision_heads': \.\.\.\}"):
        XVLMBackbone.from_pretrained(path)
    # A ViT-B/BERT-base-wide model (built on the meta device: shapes only) gets 12 heads in both encoders.
    with torch.device("meta"):
        wide = XVLMBackbone(tiny_config(VOCAB, hidden_size=768, num_heads=12, num_text_layers=2, num_fusion_layers=3,
                                        image_size=64))
    state, origin, _, _ = convert_authors_state(authors_state(wide, training_only=False), "meta")
    assert origin["fusion_encoder.layer.4.crossattention.self.key.weight"] == \
        "text_encoder.bert.encoder.layer.4.crossattention.self.key.weight"
    inferred = infer_authors_config(state, "meta")
    assert (inferred["num_attention_heads"], inferred["vision_heads"]) == (12, 12)
    assert (inferred["num_text_layers"], inferred["num_fusion_layers"], inferred["image_size"]) == (2, 3, 64)
    # config= overrides an inferred field (here a shape, which then no longer fits the file).
    with pytest.raises(ValueError, match=r"wrong shape.*vision_proj\.weight: file \(16, 32\) vs model \(8, 32\)"):
        XVLMBackbone.from_pretrained(path, config={**HEADS, "embed_dim": 8})


def test_resize_at_load_and_masks_from_one_size_apply_at_another(tmp_path):
    source = source_model()
    path = save_authors(tmp_path, authors_state(source))
    at_48 = XVLMBackbone.from_pretrained(path, config=HEADS, image_size=48).eval()
    assert at_48.config.image_size == 48 and at_48.vision_encoder.pos_embed.weight.shape == (1 + 9, 32)
    table = source.vision_encoder.pos_embed.weight
    assert torch.equal(at_48.vision_encoder.pos_embed.weight, resize_position_embeddings(table, 9))
    assert torch.equal(at_48.vision_encoder.pos_embed.weight[0], table[0])  # CLS entry kept
    assert not any("position_ids" in k for k in at_48.state_dict())
    # The resized table equals what the 32 px model interpolates at run time for 48 px images.
    a, b = outputs(source, size=48), outputs(at_48, size=48)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    # Masks computed on the 32 px model apply to the 48 px one (positions are never pruned).
    at_32 = XVLMBackbone.from_pretrained(path, config=HEADS).eval()
    result = prune(at_32, sparsity=0.5, calibration=[batch(seed=s) for s in range(2)])
    result.save(tmp_path / "masks.safetensors")
    masks = PruningResult.load(tmp_path / "masks.safetensors").apply(at_48)
    assert set(masks) == set(result.masks)
    weights = dict(at_48.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(weights[name] != 0, mask), name
    result.apply(at_32)
    a, b = outputs(at_32, size=48), outputs(at_48, size=48)
    assert torch.allclose(a["fusion_states"], b["fusion_states"], atol=1e-6)
    with pytest.raises(ValueError, match="image_size 50 is not a positive multiple of the patch size 16"):
        XVLMBackbone.from_pretrained(path, config=HEADS, image_size=50)


def test_unknown_missing_and_misshaped_tensors_are_errors_naming_them_and_the_file(tmp_path):
    good = authors_state(source_model())
    state = dict(good, **{"text_encoder.bert.pooler.dense.weight": torch.zeros(32, 32)})
    with pytest.raises(ValueError, match=r"unknown\.pth: 1 tensors that XVLMBackbone does not have: "
                                         r"\[text_encoder\.bert\.pooler\.dense\.weight\]"):
        XVLMBackbone.from_pretrained(save_authors(tmp_path, state, "unknown.pth"), config=HEADS)
    state = dict(good)
    del state["text_encoder.bert.encoder.layer.3.crossattention.self.value.bias"]
    del state["vision_encoder.encoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"missing\.pth: .*2 tensors missing from the file: "
                                         r"\[text_encoder\.bert\.encoder\.layer\.3\.crossattention\.self\.value\.bias, "
                                         r"vision_encoder\.encoder\.layers\.0\.self_attn\.k_proj\.weight\]"):
        XVLMBackbone.from_pretrained(save_authors(tmp_path, state, "missing.pth"), config=HEADS)
    state = dict(good, **{"text_encoder.bert.encoder.layer.1.intermediate.dense.weight": torch.zeros(32, 32)})
    with pytest.raises(ValueError, match=r"shape\.pth: 1 tensors of the wrong shape.*text_encoder\.bert\.encoder"
                                         r"\.layer\.1\.intermediate\.dense\.weight: file \(32, 32\) vs model \(64, 32\)"):
        XVLMBackbone.from_pretrained(save_authors(tmp_path, state, "shape.pth"), config=HEADS)
    state = {k: v for k, v in good.items() if not k.startswith("text_encoder.bert.encoder.layer.3.crossattention.")}
    with pytest.raises(ValueError, match=r"order\.pth: the layers with crossattention\.\* \(\[2\]\) must be the last"):
        XVLMBackbone.from_pretrained(save_authors(tmp_path, state, "order.pth"), config=HEADS)


def test_checkpoint_spec_dict_and_tokenizer_with_dec_enc_past_the_vocabulary(tmp_path):
    class Tokenizer:
        pad_token_id, enc_token_id, dec_token_id = 0, VOCAB + 1, VOCAB

        def __init__(self, size):
            self.size = size

        def __len__(self):
            return self.size

    path = save_authors(tmp_path, authors_state(source_model()))
    spec = {"checkpoint": str(path), "image_size": 48, "config": HEADS}
    backbone = XVLMBackbone.from_spec(spec, Tokenizer(VOCAB + 2))  # [DEC]/[ENC] past the 40 words: unused
    assert backbone.config.image_size == 48
    with pytest.raises(ValueError, match="tokenizer has 43 tokens but the backbone's vocabulary is 40"):
        XVLMBackbone.from_spec(spec, Tokenizer(VOCAB + 3))
    with pytest.raises(ValueError, match=r"unknown keys \['size'\] in the XVLM checkpoint spec"):
        XVLMBackbone.from_spec({**spec, "size": 1}, Tokenizer(VOCAB))


# ------------------------------------------------------------------------------------ masks per projection
def test_q_k_v_are_separate_prune_targets_with_their_own_ratios():
    model = source_model()
    attention = model.vision_encoder.encoder.layers[0].self_attn
    with torch.no_grad():
        attention.k_proj.weight.mul_(4.0)  # larger magnitudes: MultiFlow's Eq. 7 prunes k less than q and v
    result = prune(model, sparsity=0.6, calibration=[batch(seed=s) for s in range(2)])
    prefix = "vision_encoder.encoder.layers.0.self_attn."
    q, k, v, out = (prefix + p + ".weight" for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    for name in (q, k, v, out):
        assert result.groups[name] == "vision" and result.masks[name].shape == (32, 32), name
        pruned = 1 - result.masks[name].float().mean().item()
        assert pruned == pytest.approx(result.ratios[name], abs=2 / 1024), name
    assert result.ratios[k] < min(result.ratios[q], result.ratios[v]) - 0.2
    assert result.group_sparsity()["vision"] == pytest.approx(0.6, abs=0.005)


def test_multiflow_code_files_keep_the_mlm_head_bias_only_as_decoder_bias(tmp_path):
    """The MULTIFLOW code's xbert.py saves the MLM-head bias only as cls.predictions.decoder.bias: it loads."""
    source = source_model()
    with torch.no_grad():
        source.text_encoder.cls.predictions.bias.normal_()
    bias = source.text_encoder.cls.predictions.bias.detach().clone()
    state = authors_state(source)
    del state["text_encoder.cls.predictions.bias"]
    assert torch.equal(state["text_encoder.cls.predictions.decoder.bias"], bias)
    loaded = XVLMBackbone.from_pretrained(save_authors(tmp_path, state), config=HEADS)  # strict: nothing missing
    head = loaded.text_encoder.cls.predictions
    assert torch.equal(head.bias, bias) and head.decoder.bias is head.bias
    # this backbone's own names, as a bare state dict without the first name, load the same way
    own = {k: v for k, v in source.state_dict().items() if k != "text_encoder.cls.predictions.bias"}
    fresh = XVLMBackbone(source.config)
    fresh.load_state_dict_file(own)
    assert torch.equal(fresh.text_encoder.cls.predictions.bias, bias)
