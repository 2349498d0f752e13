"""BLIP backbone: forward, preset coverage, mask inheritance, save/load and HF checkpoint loading."""
import json

import pytest
import torch
from torch import nn
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from mflightning import prune
from mflightning.models.blip import BlipBackbone, tiny_config
from mflightning.pruning.presets import get_preset
from mflightning.pruning.targets import find_targets, resolve_modalities

VOCAB = 40  # [DEC] = 38, [ENC] = 39


def batch(n=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 38, (n, length), generator=g)
    ids[:, 0] = 2
    att = torch.ones(n, length, dtype=torch.long)
    att[1, 4:] = 0
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": att}


def backbone(**kw):
    torch.manual_seed(0)
    return BlipBackbone(tiny_config(VOCAB), **kw)


def test_forward_runs_all_branches_and_bf16():
    model = backbone().eval()
    out = model(**batch())
    assert out["image_embeds"].shape == (3, 1 + 4, 32)  # 32 px / patch 16 -> 4 patches + CLS
    assert out["grounded_states"].shape == (3, 7, 32)
    assert out["decoder_logits"].shape == (3, 7, VOCAB)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(**batch())
    assert torch.isfinite(out16["decoder_logits"].float()).all()
    # Another resolution interpolates the position embeddings.
    assert model.encode_image(torch.randn(1, 3, 48, 48)).shape == (1, 1 + 9, 32)


def test_every_linear_is_grouped_or_a_dense_head():
    model = backbone()
    targets = find_targets(model, resolve_modalities(model, None))  # uses pruning_preset = "blip"
    linears = {n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    heads = {n for n in linears if n.split(".")[0] in ("vision_proj", "text_proj", "itm_head") or ".cls.predictions." in n}
    # The LM head's decoder is tied to the word embeddings: named once, as the embedding.
    assert "text_decoder.cls.predictions.decoder.weight" in heads
    assert set(targets) == {n for n in linears - heads if n in dict(model.named_parameters())}
    for name, target in targets.items():
        assert target.group == ("vision" if name.startswith("vision_model.") else "text"), name
        cross_kv = ".crossattention.self.key." in name or ".crossattention.self.value." in name
        assert target.filter_tokens == (target.group == "text" and not cross_kv), name
    assert sum(t.group == "vision" for t in targets.values()) == 4
    assert sum(t.group == "text" for t in targets.values()) == 20  # 10 Linear per text layer, encoder + decoder


def test_tied_backbone_masks_transfer_to_untied_decoder(tmp_path):
    tied = backbone(tie_decoder=True)
    names = dict(tied.named_parameters())
    assert "text_decoder.bert.encoder.layer.0.crossattention.self.query.weight" not in names
    assert "text_decoder.bert.encoder.layer.0.attention.self.query.weight" in names
    result = prune(tied, sparsity=0.5, calibration=[batch()])
    assert not any("text_decoder.bert.encoder.layer.0.intermediate" in n for n in result.masks)
    result.save(tmp_path / "masks.safetensors")

    untied = backbone()
    untied.load_state_dict(tied.state_dict())
    masks = type(result).load(tmp_path / "masks.safetensors").masks_for(untied)
    for part in ("crossattention.self.query", "crossattention.self.key", "crossattention.output.dense",
                 "intermediate.dense", "output.dense"):
        dec = masks[f"text_decoder.bert.encoder.layer.0.{part}.weight"]
        enc = masks[f"text_encoder.encoder.layer.0.{part}.weight"]
        assert torch.equal(dec, enc), part
    # The decoder's causal self-attention keeps its own mask (computed on its own inputs).
    own = masks["text_decoder.bert.encoder.layer.0.attention.self.query.weight"]
    assert torch.equal(own, result.masks["text_decoder.bert.encoder.layer.0.attention.self.query.weight"])
    assert not torch.equal(own, masks["text_encoder.encoder.layer.0.attention.self.query.weight"])
    preset = get_preset("blip")
    assert preset.exclude and preset.inherit


def test_save_load_round_trip_untied_and_tied(tmp_path):
    for tie in (False, True):
        model = backbone(tie_decoder=tie)
        with torch.no_grad():
            model.temp.fill_(0.05)
        model.save_pretrained(tmp_path / str(tie))
        loaded = BlipBackbone.from_pretrained(tmp_path / str(tie))
        assert loaded.decoder_tied == tie
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        dec = loaded.text_decoder
        assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight


def test_from_pretrained_maps_hf_retrieval_and_caption_checkpoints(tmp_path):
    config = tiny_config(VOCAB)
    torch.manual_seed(1)
    retrieval = BlipForImageTextRetrieval(config)
    captioning = BlipForConditionalGeneration(config)
    retrieval.save_pretrained(tmp_path / "itm")
    captioning.save_pretrained(tmp_path / "cap")

    with pytest.raises(ValueError, match="text_decoder"):
        BlipBackbone.from_pretrained(tmp_path / "itm")  # no decoder anywhere
    partial = BlipBackbone.from_pretrained(tmp_path / "itm", allow_missing=("text_decoder",))
    assert torch.equal(partial.itm_head.weight, retrieval.itm_head.weight)

    model = BlipBackbone.from_pretrained(tmp_path / "itm", decoder_from=str(tmp_path / "cap"))
    mine = model.state_dict()
    for name, value in retrieval.state_dict().items():
        assert torch.equal(mine[name], value), name
    for name, value in captioning.state_dict().items():
        if name.startswith("text_decoder."):
            assert torch.equal(mine[name], value), name
    # The retrieval checkpoint's image encoder wins over the captioning one's.
    assert torch.equal(mine["vision_model.post_layernorm.weight"], retrieval.state_dict()["vision_model.post_layernorm.weight"])


def test_from_pretrained_rejects_unexpected_keys_and_unknown_architectures(tmp_path):
    from safetensors.torch import load_file, save_file

    model = backbone()
    model.save_pretrained(tmp_path / "ok")
    state = load_file(tmp_path / "ok" / "model.safetensors")
    state["text_encoder.pooler.dense.weight"] = torch.zeros(2, 2)
    (tmp_path / "bad").mkdir()
    save_file(state, str(tmp_path / "bad" / "model.safetensors"))
    (tmp_path / "bad" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(ValueError, match="unexpected keys.*pooler"):
        BlipBackbone.from_pretrained(tmp_path / "bad")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    config["architectures"] = ["BlipModel"]
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="BlipModel"):
        BlipBackbone.from_pretrained(tmp_path / "bad")


def test_check_tokenizer_names_the_disagreeing_token(tmp_path):
    from mflightning.data.tokenizer import build_tokenizer, write_vocab

    tokenizer = build_tokenizer(write_vocab(tmp_path / "vocab.txt", ["a", "b"]))  # 7 words + [DEC] + [ENC]
    ok = BlipBackbone(tiny_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id, sep_token_id=3))
    ok.check_tokenizer(tokenizer)
    wrong = BlipBackbone(tiny_config(len(tokenizer) + 2))
    with pytest.raises(ValueError, match=r"\[DEC\]"):
        wrong.check_tokenizer(tokenizer)


def test_vit_drop_path_is_timms_stochastic_depth_per_branch():
    """BLIP's ViT (timm DropPath): layer i drops each residual branch per sample with linspace(0, rate, depth)[i],
    kept samples scaled by 1/(1-p); recomputed here by hand from the layer's own modules under the same seed."""
    config = tiny_config(VOCAB, num_layers=3)
    config.vision_config.drop_path_rate = 0.5
    model = BlipBackbone(config)
    layers = model.vision_model.encoder.layers
    assert [layer.self_attn._mfl_drop_path for layer in layers] == [0.0, 0.25, 0.5]
    layer, x = layers[2].train(), torch.randn(64, 5, 32)
    torch.manual_seed(1)
    out = layer(x)
    layer.eval()  # the branches without drop path (the hooks act in training mode only; no other dropout here)
    attn = layer.self_attn(layer.layer_norm1(x))[0]
    torch.manual_seed(1)
    keep = 0.5
    h = x + attn * torch.empty(64, 1, 1).bernoulli_(keep) / keep
    expected = h + layer.mlp(layer.layer_norm2(h)) * torch.empty(64, 1, 1).bernoulli_(keep) / keep
    assert torch.allclose(out, expected, atol=1e-6)
    dropped = torch.isclose(out, x).all(dim=(1, 2))  # both branches dropped: the input passes as is
    assert 0 < int(dropped.sum()) < 64
    dense = x + attn + layer.mlp(layer.layer_norm2(x + attn))
    assert torch.allclose(layer(x), dense, atol=1e-6)  # evaluation: no drop, no scaling
    model.set_drop_path_(0.0)
    assert torch.allclose(layer.train()(x), dense, atol=1e-6)
    reloaded = BlipBackbone(BlipBackbone(config).config)  # the rate is part of the config (saved with it)
    assert reloaded.vision_model.encoder.layers[2].mlp._mfl_drop_path == 0.5
