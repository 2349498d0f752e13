"""Both backbones implement VisionLanguageBackbone: every member, compatible signatures, and the
members whose implementations differ (ITM, captioning, pretraining losses, unused parts) do what each says."""
import inspect

import pytest
import torch

from mflightning.data.tokenizer import build_tokenizer, write_vocab
from mflightning.models import BlipBackbone, VisionLanguageBackbone, XVLMBackbone, with_first_token, xvlm_tiny_config
from mflightning.models.interface import TASKS, interface_members, missing_members, require_backbone

WORDS = ["a", "red", "blue", "square", "circle", "picture", "of"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt", WORDS))


def blip(tokenizer):
    torch.manual_seed(0)
    return BlipBackbone.from_spec({"text_config": {"hidden_size": 32, "encoder_hidden_size": 32, "intermediate_size": 64,
                                                   "num_hidden_layers": 1, "num_attention_heads": 2},
                                   "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                     "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                                   "image_text_hidden_size": 16}, tokenizer).eval()


def xvlm(tokenizer):
    torch.manual_seed(0)
    return XVLMBackbone.from_spec(xvlm_tiny_config(len(tokenizer)).to_dict(), tokenizer).add_decoder_().eval()


BACKBONES = [pytest.param(blip, id="blip"), pytest.param(xvlm, id="xvlm")]


def batch(tokenizer, n=3):
    g = torch.Generator().manual_seed(0)
    enc = tokenizer(["a red square", "a picture of a blue circle", "blue"][:n], padding="max_length", max_length=8,
                    return_tensors="pt")
    return torch.randn(n, 3, 32, 32, generator=g), enc.input_ids, enc.attention_mask


def test_the_protocol_lists_what_the_tasks_use():
    assert interface_members() == [
        "pruning_preset", "temp", "pruning_loss_terms", "from_spec", "unused_parts", "add_decoder_", "enc_token_id", "dec_token_id",
        "__call__", "encode_image", "encode_text", "image_features", "text_features", "encode_grounded",
        "match_logits", "decode", "caption_logits", "generate_caption", "pretraining_losses", "named_parameters"]


@pytest.mark.parametrize("build", BACKBONES)
def test_backbone_implements_every_member_with_compatible_signatures(tokenizer, build):
    backbone = build(tokenizer)
    assert isinstance(backbone, VisionLanguageBackbone) and missing_members(backbone) == []
    for name in interface_members():
        declared = inspect.getattr_static(VisionLanguageBackbone, name, None)
        if not callable(declared) and not isinstance(declared, classmethod) or name == "__call__":
            continue
        wanted = inspect.signature(getattr(VisionLanguageBackbone, name)).parameters
        have = inspect.signature(getattr(backbone, name)).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in have.values())
        for param in wanted.values():
            if param.name in ("self", "cls") or param.kind is param.VAR_KEYWORD:
                continue
            assert param.name in have or takes_kwargs, f"{type(backbone).__name__}.{name} lacks {param.name!r}"
            if param.default is not param.empty and param.name in have:
                assert have[param.name].default is not param.empty, f"{name}({param.name}) must stay optional"


def test_an_incomplete_backbone_is_refused_by_name():
    with pytest.raises(TypeError, match=r"Linear does not implement VisionLanguageBackbone: it lacks \['pruning_preset'"):
        require_backbone(torch.nn.Linear(2, 2))


def test_blip_itm_and_captions_read_the_grounded_encoder_and_decoder(tokenizer):
    backbone = blip(tokenizer)
    image, ids, att = batch(tokenizer)
    embeds = backbone.encode_image(image)
    enc = with_first_token(ids, backbone.enc_token_id)
    with torch.no_grad():
        expected = backbone.itm_logits(backbone.encode_grounded(enc, att, embeds))
        assert torch.allclose(backbone.match_logits(enc, att, embeds), expected)
        assert torch.allclose(backbone.match_logits(enc, att, embeds, text_states=torch.zeros(3, 8, 32)), expected)
        dec = with_first_token(ids, backbone.dec_token_id)
        assert torch.equal(backbone.caption_logits(dec, att, embeds), backbone.decode(dec, att, embeds))
    assert (backbone.enc_token_id, backbone.dec_token_id) == (tokenizer.enc_token_id, tokenizer.bos_token_id)


def test_xvlm_itm_runs_the_fusion_encoder_on_the_text_states(tokenizer):
    backbone = xvlm(tokenizer)
    image, ids, att = batch(tokenizer)
    with torch.no_grad():
        embeds = backbone.encode_image(image)
        states = backbone.encode_text(ids, att)
        expected = backbone.itm_logits(backbone.fuse(states, att, embeds))
        assert torch.allclose(backbone.match_logits(ids, att, embeds), expected, atol=1e-6)
        assert torch.allclose(backbone.match_logits(ids, att, embeds, text_states=states), expected, atol=1e-6)
        other = backbone.match_logits(ids, att, embeds, text_states=torch.zeros_like(states))
    assert not torch.allclose(other, expected)  # the given states are what the fusion encoder reads
    assert backbone.enc_token_id is None and backbone.dec_token_id is None  # [CLS] everywhere


@pytest.mark.parametrize("build", BACKBONES)
def test_caption_generation_continues_the_prompt(tokenizer, build):
    backbone = build(tokenizer)
    image, _, _ = batch(tokenizer, n=2)
    prompt = tokenizer(["a picture of"] * 2, return_tensors="pt").input_ids[:, :-1]
    prompt = with_first_token(prompt, backbone.dec_token_id)
    generated = backbone.generate_caption(prompt, backbone.encode_image(image), num_beams=2, min_length=5,
                                          max_length=7, eos_token_id=tokenizer.sep_token_id,
                                          pad_token_id=tokenizer.pad_token_id)
    assert isinstance(generated, list) and len(generated) == 2
    assert all(isinstance(t, int) for ids in generated for t in ids)
    assert all(1 <= len(ids) <= 7 - prompt.size(1) for ids in generated)


@pytest.mark.parametrize("build", BACKBONES)
def test_pretraining_losses_and_unused_parts(tokenizer, build):
    backbone = build(tokenizer).train()
    image, ids, att = batch(tokenizer)
    losses = backbone.pretraining_losses(image, ids, att, torch.arange(3), tokenizer)
    assert set(losses) == ({"itc", "itm", "lm"} if isinstance(backbone, BlipBackbone) else {"itc", "itm", "mlm", "caption_lm", "lm"})
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    names = [n for n, _ in backbone.named_parameters()]
    for task in TASKS:
        parts = backbone.unused_parts(task)
        assert parts and all(any(n == p or n.startswith(p + ".") for n in names) for p in parts), task
    with pytest.raises(ValueError, match="unknown task 'detection'"):
        backbone.unused_parts("detection")
    assert type(backbone).from_spec(backbone, tokenizer) is backbone
