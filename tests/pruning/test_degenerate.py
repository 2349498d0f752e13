"""Degenerate scores are an error naming the layers and the likely cause, unless allow_degenerate=True."""
import warnings

import pytest
import torch
import torchvision
from torch import nn

from mflightning import prune
from mflightning.pruning import PruningConfig


def vit():
    """torchvision's ViT, which zero-initialises its classification head."""
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


def images():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]


def loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("method", ["snip", "itersnip"])
def test_a_gradient_method_through_a_zero_initialised_head_is_an_error_naming_the_layers(method):
    model = vit()
    assert not model.heads.head.weight.any()
    options = dict(sparsity=0.5, method=method, calibration=images(), loss=loss, rounds=2)
    with pytest.raises(ValueError, match=rf"method '{method}' at sparsity 0.5: degenerate scores: \d+ layer\(s\) have all "
                                         r"their scores equal: encoder\.layers\.encoder_layer_0\.self_attention\.in_proj_weight "
                                         r"\(100\.0% pruned, 100% zero scores\).*zero-initialised head.*allow_degenerate=True"):
        prune(model, **options)
    with pytest.warns(UserWarning, match="more than 99% pruned"):  # opted in: what the scores say, whole layers
        assert prune(model, **options, allow_degenerate=True).sparsity > 0.99
    assert prune(model, **{**options, "sparsity": 0.0}).sparsity == 0.0  # equal scores, nothing pruned: no harm


def test_dead_inputs_tied_at_zero_score_overshooting_the_target_are_an_error():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(8, 16)
    x[:, 4:] = 0  # 12 of 16 input features never set
    with pytest.raises(ValueError, match=r"method 'multiflow' at sparsity 0.5: degenerate scores: tied scores .* realised "
                                         r"sparsity 0\.6\d+, more than 1% over the target: 0\.weight \(75\.0% pruned, 75% "
                                         r"zero scores\).*dead inputs"):
        prune(mlp, sparsity=0.5, calibration=[x])
    config = PruningConfig(sparsity=0.5, allow_degenerate=True)
    assert prune(mlp, config, calibration=[x]).sparsity > 0.6
    x[:, 4:] = torch.randn(8, 12)  # live inputs: no ties, the target holds
    assert prune(mlp, sparsity=0.5, calibration=[x]).sparsity == pytest.approx(0.5, abs=0.001)


class WeightNormed(nn.Module):
    def __init__(self, new_api: bool):
        super().__init__()
        wrap = nn.utils.parametrizations.weight_norm if new_api else nn.utils.weight_norm
        self.plain = nn.Linear(8, 8)
        self.normed = wrap(nn.Linear(8, 8))

    def forward(self, x):
        return self.normed(self.plain(x))


@pytest.mark.parametrize("new_api", [True, False], ids=["parametrizations.weight_norm", "weight_norm"])
def test_weight_norm_linears_are_refused_by_name_unless_excluded(new_api):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old weight_norm is deprecated, and still in use
        model = WeightNormed(new_api)
    with pytest.raises(ValueError, match=r"1 nn\.Linear layer\(s\) compute their weight.*\['normed\.weight'\].*"
                                         r"remove_parametrizations.*exclude="):
        prune(model, sparsity=0.5, method="omp")
    result = prune(model, sparsity=0.5, method="omp", exclude=[r"^normed\."])
    assert list(result.masks) == ["plain.weight"]
