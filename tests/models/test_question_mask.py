"""The VQA decoder's cross-attention honours the question's padding mask (BLIP and XVLM).

transformers 5.x's BLIP text layers drop the encoder mask on the way to the cross-attention, so a
decoder would attend to the question's PAD states; `honour_cross_attention_masks` puts it back.
"""
import pytest
import torch

from mflightning.models.blip import BlipBackbone, honour_cross_attention_masks
from mflightning.models.blip import tiny_config as blip_tiny
from mflightning.models.xvlm import XVLMBackbone
from mflightning.models.xvlm import tiny_config as xvlm_tiny

VOCAB = 40


def build(family):
    torch.manual_seed(0)
    if family == "blip":
        return BlipBackbone(blip_tiny(VOCAB)).eval()
    model = XVLMBackbone(xvlm_tiny(VOCAB)).eval()
    model.add_decoder_()
    return model.eval()


@pytest.mark.parametrize("family", ["blip", "xvlm"])
def test_padded_question_positions_are_not_attended(family):
    model = build(family)
    g = torch.Generator().manual_seed(1)
    real, padded = 4, 9
    states = torch.randn(2, padded, 32, generator=g)
    mask = torch.zeros(2, padded, dtype=torch.long)
    mask[:, :real] = 1
    answers = torch.randint(5, VOCAB - 2, (2, 3), generator=g)
    answer_mask = torch.ones_like(answers)
    with torch.no_grad():
        unpadded = model.decode(answers, answer_mask, states[:, :real], torch.ones(2, real, dtype=torch.long))
        with_pad = model.decode(answers, answer_mask, states, mask)
        other_pad = states.clone()
        other_pad[:, real:] = 100 * torch.randn(2, padded - real, 32, generator=g)
        with_other_pad = model.decode(answers, answer_mask, other_pad, mask)
        all_real = model.decode(answers, answer_mask, other_pad, torch.ones_like(mask))
    # PAD states change nothing; attending to them (an all-ones mask) does.
    assert torch.allclose(with_pad, unpadded, atol=1e-5)
    assert torch.allclose(with_other_pad, unpadded, atol=1e-5)
    assert not torch.allclose(all_real, unpadded, atol=1e-3)


def test_hook_is_installed_once_per_cross_attention_and_survives_untying():
    model = BlipBackbone(blip_tiny(VOCAB), tie_decoder=True)
    layers = len(model.text_encoder.encoder.layer)
    assert honour_cross_attention_masks(model.text_encoder) == 0  # already hooked at construction
    model.untie_decoder_()  # deep copies of the shared modules keep the hook
    for layer in model.text_decoder.bert.encoder.layer:
        assert len(layer.crossattention.self._forward_pre_hooks) == 1
    assert layers == len(model.text_decoder.bert.encoder.layer)
