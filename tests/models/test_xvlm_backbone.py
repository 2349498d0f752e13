"""XVLM backbone: groups and dense heads, bidirectional fusion, decoder mask inheritance, checkpoints."""
import pytest
import torch
from torch import nn

from mflightning import PruningResult, prune
from mflightning.models.xvlm import XVLMBackbone, XVLMConfig, tiny_config
from mflightning.pruning.allocation import pooled_ratios
from mflightning.pruning.presets import get_preset
from mflightning.pruning.targets import find_targets, resolve_modalities

VOCAB = 40
HEADS = ("vision_proj.", "text_proj.", "itm_head.", "bbox_head.", "text_encoder.cls.", "text_decoder.cls.")


def batch(n=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, length), generator=g)
    ids[:, 0] = 2
    att = torch.ones(n, length, dtype=torch.long)
    att[1, 4:] = 0
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": att}


def backbone(**overrides):
    torch.manual_seed(0)
    return XVLMBackbone(tiny_config(VOCAB, **overrides))


def test_three_groups_heads_dense_and_cross_attention_unfiltered():
    model = backbone(num_text_layers=2, num_fusion_layers=2).add_decoder_()
    targets = find_targets(model, resolve_modalities(model, None))  # pruning_preset = "xvlm"
    params = dict(model.named_parameters())
    linears = {n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    heads = {n for n in linears if n.startswith(HEADS)}
    assert {"itm_head.3.weight", "bbox_head.0.weight", "vision_proj.weight"} <= heads
    assert set(targets) == {n for n in linears - heads if n in params}
    # Global layer numbering: text 0-1, fusion (and the decoder copied from it) 2-3.
    assert "text_encoder.encoder.layer.1.attention.self.query.weight" in targets
    assert "fusion_encoder.layer.2.crossattention.self.key.weight" in targets
    assert "text_decoder.layer.3.crossattention.self.value.weight" in targets
    for name, target in targets.items():
        group = {"vision_encoder": "vision", "text_encoder": "text"}.get(name.split(".")[0], "fusion")
        assert target.group == group, name
        image_input = name.startswith("fusion_encoder.") and ".crossattention.self." in name and (
            ".key." in name or ".value." in name)
        assert target.filter_tokens == (group != "vision" and not image_input), name
    counts = {g: sum(t.group == g for t in targets.values()) for g in ("vision", "text", "fusion")}
    assert counts == {"vision": 6, "text": 2 * 6, "fusion": 2 * 10 + 2 * 10}  # vision: q, k, v, out, fc1, fc2
    vision = sorted(n for n in targets if n.startswith("vision_encoder."))
    assert vision == sorted(f"vision_encoder.encoder.layers.0.{p}.weight" for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"))
    assert not any("patch_embed" in n or "pos_embed" in n for n in targets)  # the patch conv stays dense
    assert get_preset("xvlm").inherit


def test_fusion_and_text_encoders_are_bidirectional_captioning_and_decoder_causal():
    model = backbone().add_decoder_().eval()
    b = batch(n=2)
    ids = b["input_ids"]
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1 - 5) % (VOCAB - 5) + 5  # another word at position 5
    att = torch.ones_like(ids)
    with torch.no_grad():
        image = model.encode_image(b["image"])
        text, text_changed = model.encode_text(ids, att), model.encode_text(changed, att)
        mixed = torch.cat([text[:, :5], text_changed[:, 5:]], dim=1)  # fusion input differs only from position 5
        fused, fused_mixed = model.fuse(text, att, image), model.fuse(mixed, att, image)
        caption, caption_changed = model.caption_logits(ids, att, image), model.caption_logits(changed, att, image)
        decoded, decoded_changed = model.decode(ids, att, fused), model.decode(changed, att, fused)
    # A later token changes earlier tokens' outputs in the text encoder and in the fusion layers.
    assert not torch.allclose(text[:, :5], text_changed[:, :5], atol=1e-5)
    assert not torch.allclose(fused[:, :5], fused_mixed[:, :5], atol=1e-5)
    # Captioning (text + fusion with causal masks) and the VQA decoder never look ahead.
    assert torch.allclose(caption[:, :5], caption_changed[:, :5], atol=1e-5)
    assert not torch.allclose(caption[:, 5:], caption_changed[:, 5:], atol=1e-5)
    assert torch.allclose(decoded[:, :5], decoded_changed[:, :5], atol=1e-5)
    # Padding: what sits behind attention_mask = 0 does not change real tokens' fusion states.
    pad = att.clone()
    pad[:, 5:] = 0
    with torch.no_grad():
        a, c = model.encode_grounded(ids, pad, image), model.encode_grounded(changed, pad, image)
    assert torch.allclose(a[:, :5], c[:, :5], atol=1e-5)


def test_forward_shapes_other_resolution_timm_name_and_bf16():
    model = backbone().eval()
    out = model(**batch())
    assert out["image_embeds"].shape == (3, 1 + 4, 32)
    assert out["fusion_states"].shape == (3, 7, 32) and "decoder_logits" not in out
    assert model.encode_image(torch.randn(1, 3, 48, 48)).shape == (1, 1 + 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(**batch())["fusion_states"].float()).all()
    # A timm model name (built offline, no weights) with a different ViT width: cross-attention reads it.
    named = XVLMBackbone(tiny_config(VOCAB, vision_layout="timm", vision_model="vit_base_patch16_clip_224",
                                     vision_kwargs=dict(embed_dim=48, depth=1, num_heads=2)))
    assert type(named.vision_encoder).__name__ == "VisionTransformer"
    assert named.fusion_encoder.layer["1"].crossattention.self.key.weight.shape == (32, 48)
    assert named(**batch())["fusion_states"].shape == (3, 7, 32)
    with pytest.raises(ValueError, match="as wide as the text encoder"):
        named.add_decoder_()
    with pytest.raises(ValueError, match="unknown XVLM config keys.*'hidden'"):
        XVLMBackbone({"hidden": 3})


def test_vision_weights_from_a_local_timm_file_at_another_resolution(tmp_path):
    import timm

    vit = dict(embed_dim=32, depth=1, num_heads=2)
    source = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=0, img_size=32, **vit)
    torch.save(source.state_dict(), tmp_path / "clip_vit.pth")
    model = XVLMBackbone(tiny_config(VOCAB, image_size=48, vision_layout="timm", vision_model="vit_base_patch16_clip_224",
                                     vision_kwargs=vit,
                                     vision_checkpoint=str(tmp_path / "clip_vit.pth")))
    assert torch.equal(model.vision_encoder.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
    assert model.vision_encoder.pos_embed.shape == (1, 1 + 9, 32)  # resampled from 32 px to 48 px
    model.save_pretrained(tmp_path / "saved")  # the saved config no longer points at the timm file
    assert XVLMBackbone.from_pretrained(tmp_path / "saved").config.vision_checkpoint is None
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        XVLMBackbone(tiny_config(VOCAB, vision_layout="timm", vision_model="vit_base_patch16_clip_224", vision_kwargs=vit,
                                 vision_checkpoint=str(tmp_path / "nowhere.pth")))


def test_masks_of_the_pretrained_backbone_reach_the_decoder():
    pretrained = backbone()
    result = prune(pretrained, sparsity=0.5, calibration=[batch(seed=s) for s in range(2)])
    assert set(result.groups.values()) == {"vision", "text", "fusion"}
    assert not any(n.startswith("text_decoder.") for n in result.masks)
    vqa = backbone().add_decoder_()
    for name, p in vqa.text_decoder.layer.named_parameters():
        assert torch.equal(p, dict(vqa.fusion_encoder.layer.named_parameters())[name]), name
    masks = result.masks_for(vqa)
    decoder = [n for n in masks if n.startswith("text_decoder.")]
    assert len(decoder) == 10  # every Linear of the copied fusion layer, self-attention included
    for name in decoder:
        assert torch.equal(masks[name], masks[name.replace("text_decoder.", "fusion_encoder.")]), name
    # Calibrated with its decoder, the decoder gets masks of its own (its inputs differ).
    own = prune(vqa, sparsity=0.5, calibration=[batch()])
    name = "text_decoder.layer.1.intermediate.dense.weight"
    assert own.groups[name] == "fusion"
    assert not torch.equal(own.masks[name], own.masks[name.replace("text_decoder.", "fusion_encoder.")])


def test_modality_allocation_keeps_each_group_at_the_target():
    model = backbone(num_text_layers=2, num_fusion_layers=2)
    result = prune(model, sparsity=0.7, calibration=[batch(seed=s) for s in range(2)])
    groups = result.group_sparsity()
    assert set(groups) == {"vision", "text", "fusion"}
    for group, value in groups.items():
        assert value == pytest.approx(0.7, abs=0.005), group
    # Layer-wise ratios are Eq. 7's: one magnitude pool per modality.
    expected = pooled_ratios(result.magnitudes, result.groups, 0.7)
    for name, mask in result.masks.items():
        assert int((~mask).sum()) >= expected[name] and int((~mask).sum()) <= expected[name] + 2, name
    layer_ratios = {n: r for n, r in result.ratios.items() if result.groups[n] == "text"}
    assert max(layer_ratios.values()) - min(layer_ratios.values()) > 0.001  # non-uniform inside a group


def test_save_load_round_trip_with_decoder_and_tied_heads(tmp_path):
    model = backbone().add_decoder_()
    with torch.no_grad():
        model.temp.fill_(0.05)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = XVLMBackbone.from_pretrained(tmp_path / "ckpt")
    assert loaded.text_decoder is not None and loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cls = loaded.text_encoder.cls.predictions
    assert cls.decoder.weight is loaded.text_encoder.embeddings.word_embeddings.weight
    assert loaded.text_decoder.cls.predictions.decoder.weight is loaded.text_decoder.embeddings.word_embeddings.weight
    # A torch file under "model" and a task module's "backbone." names load too.
    torch.save({"model": {f"backbone.{k}": v for k, v in a.items()}}, tmp_path / "task.pth")
    again = XVLMBackbone.from_pretrained(tmp_path / "task.pth", config=model.config)
    layer = "fusion_encoder.layer.1.output.dense.weight"
    assert torch.equal(again.state_dict()[layer], a[layer])


def test_state_dict_errors_name_the_keys(tmp_path):
    model = backbone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["fusion_encoder.layer.1.crossattention.self.key.weight"]
    state["fusion_encoder.layer.7.attention.self.query.weight"] = torch.zeros(32, 32)
    torch.save(state, tmp_path / "bad.pt")
    missing = r"1 missing keys: \[fusion_encoder\.layer\.1\.crossattention\.self\.key\.weight\]"
    unexpected = r"1 unexpected keys: \[fusion_encoder\.layer\.7\.attention\.self\.query\.weight\]"
    with pytest.raises(ValueError, match=rf"bad\.pt.*{missing}.*{unexpected}"):
        backbone().load_state_dict_file(tmp_path / "bad.pt")
    report = backbone().load_state_dict_file(tmp_path / "bad.pt", strict=False)
    assert report == {"missing": ["fusion_encoder.layer.1.crossattention.self.key.weight"],
                      "unexpected": ["fusion_encoder.layer.7.attention.self.query.weight"]}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["text_proj.weight"] = torch.zeros(8, 32)
    with pytest.raises(ValueError, match=r"shape mismatches: \['text_proj\.weight: file \(8, 32\) vs model \(16, 32\)"):
        backbone().load_state_dict_file(state)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["text_encoder.cls.predictions.decoder.weight"] = torch.zeros(VOCAB, 32)
    with pytest.raises(ValueError, match="different values under two names of one tied tensor.*cls.predictions.decoder.weight"):
        backbone().load_state_dict_file(state)
    with pytest.raises(FileNotFoundError, match="no config given and no config.json"):
        XVLMBackbone.from_pretrained(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        XVLMBackbone.from_pretrained(tmp_path / "missing.pt", config=XVLMConfig())
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable torch state-dict file"):
        backbone().load_state_dict_file(tmp_path / "junk.pt")


def test_mask_file_round_trip_applies_to_a_task_style_prefix(tmp_path):
    result = prune(backbone(), sparsity=0.6, method="omp")
    result.save(tmp_path / "m.safetensors")

    class Holder(nn.Module):
        pruning_preset = "xvlm"

        def __init__(self):
            super().__init__()
            self.backbone = backbone().add_decoder_()

    holder = Holder()
    masks = PruningResult.load(tmp_path / "m.safetensors").apply(holder)
    assert len(masks) == len(result.masks) + 10
    weight = holder.backbone.text_decoder.layer["1"].attention.self.query.weight
    assert torch.equal(weight != 0, masks["backbone.text_decoder.layer.1.attention.self.query.weight"])
