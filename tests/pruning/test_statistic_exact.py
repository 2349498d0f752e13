"""The statistic end to end on hand-made inputs: prune() must use the L2 norm of each input feature,
and cross-attention key/value projections (image tokens) are never PAD-filtered by the text mask."""
import pytest
import torch
from torch import nn

from mflightning import prune
from mflightning.pruning import collect_input_norms, find_targets, resolve_modalities


def test_prune_scores_with_the_l2_norm_of_the_inputs_not_the_squared_sum():
    # one token x = [2, 3, 4]: sum of squares [4, 9, 16], L2 norm a = [2, 3, 4]; with this W the
    # MultiFlow scores are [[35, 10.94, 140], [12, 30, 32]] (see test_core_scores), so half kept is:
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -0.5, 3.0], [-1.0, 2.0, 1.0]]))
    result = prune(layer, sparsity=0.5, allocation="layer", calibration=[torch.tensor([[2.0, 3.0, 4.0]])])
    assert result.masks["weight"].tolist() == [[True, False, True], [False, False, True]]
    # norms equal to the squared sums [4, 9, 16] (the input a**2 has them as its L2 norm) keep another half
    squared = prune(layer, sparsity=0.5, allocation="layer", calibration=[torch.tensor([[4.0, 9.0, 16.0]])])
    assert squared.masks["weight"].tolist() != result.masks["weight"].tolist()


class CrossAttention(nn.Module):
    """BLIP-style names: text queries, image keys/values, text FFN."""

    def __init__(self):
        super().__init__()
        self.crossattention = nn.Module()
        self.crossattention.self = nn.Module()
        self.crossattention.self.query = nn.Linear(4, 4)
        self.crossattention.self.key = nn.Linear(4, 4)
        self.crossattention.self.value = nn.Linear(4, 4)

    def forward(self, text, image, attention_mask):
        q = self.crossattention.self.query(text)
        k, v = self.crossattention.self.key(image), self.crossattention.self.value(image)
        return (q @ k.transpose(1, 2)).softmax(-1) @ v


def test_cross_attention_key_value_read_image_tokens_unfiltered_while_the_query_is_filtered():
    torch.manual_seed(0)
    model = CrossAttention()
    text, image = torch.randn(2, 3, 4), torch.randn(2, 3, 4)  # as many image tokens as text tokens
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    batch = {"text": text, "image": image, "attention_mask": mask}
    # text and image both floats of the mask's dims: only a declaration tells them apart (none is an image group:
    # the key/value projections are image readers by the preset's unfiltered regex)
    undeclared = find_targets(model, resolve_modalities(model, {"text": "crossattention"}))
    with pytest.raises(ValueError, match=r"'crossattention\.self\.query\.weight'.*may be word vectors or image patches"):
        collect_input_norms(model, undeclared, [batch])
    targets = find_targets(model, resolve_modalities(model, {"text": "crossattention"}, image_groups=()))
    stats = collect_input_norms(model, targets, [batch])
    real = mask.bool()
    assert torch.allclose(stats.sums["crossattention.self.query.weight"], text[real].square().sum(0).double())
    for name in ("key", "value"):  # every image token counts, though (B, L) matches the text mask
        assert torch.allclose(stats.sums[f"crossattention.self.{name}.weight"], image.square().sum((0, 1)).double())


def test_batch_major_flattened_tokens_drop_padding_too():
    """A layer fed (B*L, D) (tokens flattened batch-major, as OPT's fc1/fc2) leaves the padded rows out."""
    import torch
    from torch import nn

    from mflightning.pruning.stats import collect_input_norms

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, attention_mask):
            return self.fc(x.reshape(-1, x.shape[-1]))

    torch.manual_seed(0)
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    model = Flat()
    from mflightning.pruning.targets import find_targets, resolve_modalities

    targets = find_targets(model, resolve_modalities(model, {"text": r"fc\."}, ()))
    got = collect_input_norms(model, targets, [{"x": x, "attention_mask": mask}], forward=lambda m, b: m(**b),
                              token_mask=lambda b: b["attention_mask"])
    expected = x[mask.bool()].square().sum(0)
    assert torch.allclose(got.sums["fc.weight"].float(), expected)
