"""Which layer inputs the text mask filters is traced from the batch, never decided by equal shapes.

A timm ViT with 17 tokens (16 patches + CLS) beside a transformers BERT reading 17-token texts: the
vision layers' inputs have the text mask's (B, L) dims, yet must never be PAD-filtered.
"""
import pytest
import timm
import torch
from torch import nn
from transformers import BertConfig, BertModel

from mflightning import prune
from mflightning.pruning import find_targets, resolve_modalities
from mflightning.pruning.stats import collect_input_norms

MAP = {"vision": r"^vision\.", "text": r"^text\."}


class TimmViTAndBert(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vision = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1,
            num_heads=2, num_classes=0,
        )
        config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32)
        self.text = BertModel(config, add_pooling_layer=False)

    def forward(self, pixel_values, input_ids, attention_mask):
        image = self.vision.forward_features(pixel_values)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return image.mean() + text.mean()


def batches(n=2, length=17):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        lengths = torch.tensor([length, 5, 9, 3])
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        out.append({"pixel_values": torch.randn(4, 3, 32, 32, generator=g),
                    "input_ids": torch.randint(1, 40, (4, length), generator=g) * mask, "attention_mask": mask})
    return out


def direct_sums(model, data):
    """Per layer, the sum of squared inputs: vision over every token, text over the mask's tokens only."""
    sums, current = {}, {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach()
            if name.startswith("text."):
                x = x[current["mask"]]
            sums[name] = sums.get(name, 0) + x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
        return fn

    handles = [m.register_forward_pre_hook(hook(f"{n}.weight")) for n, m in model.named_modules()
               if isinstance(m, nn.Linear)]
    model.eval()
    with torch.no_grad():
        for batch in data:
            current["mask"] = batch["attention_mask"].bool()
            model(**batch)
    for h in handles:
        h.remove()
    return sums


@pytest.mark.parametrize("modalities", [MAP, None], ids=["user map", "one group"])
def test_image_tokens_are_never_filtered_when_their_count_equals_the_text_length(modalities):
    model, data = TimmViTAndBert(), batches()
    assert model.vision.forward_features(data[0]["pixel_values"]).shape[1] == data[0]["input_ids"].shape[1] == 17
    targets = find_targets(model, resolve_modalities(model, modalities))
    assert all(t.infer_text_tokens for t in targets.values())  # nothing declared: traced
    stats = collect_input_norms(model, targets, data)
    expected = direct_sums(model, data)
    assert {n for n in targets if n.startswith("vision.")} and {n for n in targets if n.startswith("text.")}
    for name in targets:
        torch.testing.assert_close(stats.sums[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)
    # and the parameters' requires_grad flags are back
    assert all(p.requires_grad for p in model.parameters())


def test_traced_masks_equal_the_declared_ones():
    model, data = TimmViTAndBert(), batches()
    traced = prune(model, sparsity=0.5, calibration=data, modalities=MAP)
    declared = prune(model, sparsity=0.5, calibration=data, modalities=MAP, image_groups=["vision"])
    assert all(torch.equal(traced.masks[n], declared.masks[n]) for n in declared.masks)


class FloatTokens(nn.Module):
    """Patch tokens and word vectors both given as floats: nothing says which is text."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(4, 4)
        self.text = nn.Linear(4, 4)

    def forward(self, patches, words, attention_mask):
        return self.image(patches).mean() + self.text(words).mean()


def float_batch(length=3):
    g = torch.Generator().manual_seed(0)
    return {"patches": torch.randn(2, 3, 4, generator=g), "words": torch.randn(2, length, 4, generator=g),
            "attention_mask": (torch.arange(length)[None] < torch.tensor([[length], [1]])).long()}


def test_an_untraceable_text_input_with_coinciding_shapes_asks_for_image_groups():
    model = FloatTokens()
    with pytest.raises(ValueError, match=r"'image\.weight'.*cannot be known: .*2 such tensors may be word vectors or image patches.*image_groups="):
        prune(model, sparsity=0.5, calibration=[float_batch()], modalities={"image": "^image", "text": "^text"})
    # declared, both ways, it runs: the image group unfiltered, or nothing an image group
    batch = float_batch()
    declared = find_targets(model, resolve_modalities(model, {"image": "^image", "text": "^text"}, image_groups="image"))
    stats = collect_input_norms(model, declared, [batch])
    torch.testing.assert_close(stats.sums["image.weight"].float(), batch["patches"].pow(2).sum((0, 1)))
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(stats.sums["text.weight"].float(), batch["words"][mask].pow(2).sum(0))
    prune(model, sparsity=0.5, calibration=[batch], modalities={"image": "^image", "text": "^text"}, image_groups=())
    # 5 words, 3 patches: the one float tensor of the mask's dims is the text, traced as such
    batch = float_batch(length=5)
    targets = find_targets(model, resolve_modalities(model, {"image": "^image", "text": "^text"}))
    stats = collect_input_norms(model, targets, [batch])
    torch.testing.assert_close(stats.sums["image.weight"].float(), batch["patches"].pow(2).sum((0, 1)))
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(stats.sums["text.weight"].float(), batch["words"][mask].pow(2).sum(0))


class NoGradInside(FloatTokens):
    """Text from an embedding, but the forward switches gradients off: the probe cannot trace it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, patches, input_ids, attention_mask):
        with torch.no_grad():
            return self.image(patches).mean() + self.text(self.embed(input_ids)).mean()


def test_a_forward_without_gradients_cannot_be_traced_and_says_so():
    batch = {"patches": torch.randn(2, 3, 4), "input_ids": torch.randint(0, 10, (2, 3)),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])}
    with pytest.raises(ValueError, match=r"'image\.weight'.*cannot be known.*image_groups="):
        prune(NoGradInside(), sparsity=0.5, calibration=[batch], modalities={"image": "^image", "text": "^(text|embed)"})
