"""Vision-only presets on tiny random models of transformers (ViT, DeiT, Dinov2), timm and torchvision:
recognised without a map, every encoder layer reached and in the one image group, heads dense."""
import re

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT
from transformers import (
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from mflightning import prune
from mflightning.models.vit_families import images_of, load_vision_backbone
from mflightning.pruning import collect_input_norms, find_targets, resolve_modalities
from mflightning.pruning.presets import calibration_adapter, recognise_preset

SIZE = 32
HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE, patch_size=8)


def _random(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0, 0.1)
    return model.eval()


MODELS = {
    # name: (builder, preset, encoder-layer regex (all masked), dense layers (regex, each must be present))
    "ViTModel": (lambda: ViTModel(ViTConfig(**HF, intermediate_size=64)), "vit", r"^layers\.[01]\.",
                 [r"^pooler\.dense\.weight$"]),
    "ViTForImageClassification": (lambda: ViTForImageClassification(ViTConfig(**HF, intermediate_size=64, num_labels=3)),
                                  "vit", r"^vit\.layers\.[01]\.", [r"^classifier\.weight$"]),
    "DeiTWithTeacher": (lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**HF, intermediate_size=64, num_labels=3)),
                        "vit", r"^deit\.layers\.[01]\.", [r"^cls_classifier\.weight$", r"^distillation_classifier\.weight$"]),
    "Dinov2Model": (lambda: Dinov2Model(Dinov2Config(**HF, mlp_ratio=2)), "vit", r"^encoder\.layer\.[01]\.", []),
    "Dinov2ForImageClassification": (
        lambda: Dinov2ForImageClassification(Dinov2Config(**HF, mlp_ratio=2, num_labels=3)), "vit",
        r"^dinov2\.encoder\.layer\.[01]\.", [r"^classifier\.weight$"]),
    "timm": (lambda: TimmViT(img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3),
             "timm_vit", r"^blocks\.[01]\.", [r"^head\.weight$"]),
    "timm_map": (lambda: TimmViT(img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3,
                                 global_pool="map", class_token=False),
                 "timm_vit", r"^blocks\.[01]\.", [r"^head\.weight$", r"^attn_pool\."]),
    "torchvision": (lambda: TorchvisionViT(image_size=SIZE, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                           mlp_dim=64, num_classes=3),
                    "torchvision_vit", r"^encoder\.layers\.encoder_layer_[01]\.", [r"^heads\.head\.weight$"]),
}


def images(n=2, size=SIZE):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, size, size, generator=generator) for _ in range(n)]


def _prunable(model):
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            names.add(f"{name}.weight")
        elif isinstance(module, nn.MultiheadAttention):
            names |= {f"{name}.in_proj_weight", f"{name}.out_proj.weight"}
    return names


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_vision_model_is_recognised_fully_reached_and_keeps_heads_dense(name):
    build, preset, layers, dense = MODELS[name]
    model = _random(build())
    data = images()
    assert recognise_preset(model) == preset
    result = prune(model, sparsity=0.5, calibration=data)  # no modalities, no forward: the preset's adapter runs it
    assert result.preset == preset and set(result.groups.values()) == {"vision"}
    assert all(re.search(layers, n) for n in result.masks), sorted(result.masks)
    # every prunable layer is masked or one of the dense heads, and every listed head is dense
    assert set(result.masks) | set(result.dense_layers) == _prunable(model)
    assert all(any(re.search(p, n) for p in dense) for n in result.dense_layers), result.dense_layers
    assert all(any(re.search(p, n) for n in result.dense_layers) for p in dense)
    # 2 blocks x (q, k, v, o, fc1, fc2) or fused qkv (timm) / in_proj (torchvision): 4 layers each
    assert len(result.masks) == (8 if preset != "vit" else 12)
    # every masked layer ran on every calibration batch, with all image tokens counted (no PAD filter)
    spec = resolve_modalities(model, preset)
    targets = find_targets(model, spec)
    adapter = calibration_adapter(model, preset)
    stats = collect_input_norms(model, targets, data, forward=adapter.forward, token_mask=adapter.token_mask)
    assert set(targets) == set(result.masks) and all(count >= len(data) for count in stats.calls.values())
    assert spec.image_groups == ("vision",)
    assert result.sparsity == pytest.approx(0.5, abs=0.01)


def test_the_adapter_takes_tensors_dicts_and_image_label_pairs_alike():
    model = _random(MODELS["ViTForImageClassification"][0]())
    data = images()
    want = prune(model, sparsity=0.6, calibration=data)
    forms = [lambda x: {"pixel_values": x, "labels": torch.zeros(2)}, lambda x: {"image": x},
             lambda x: (x, torch.zeros(2, dtype=torch.long))]
    for wrap in forms:
        got = prune(model, sparsity=0.6, calibration=[wrap(x) for x in data])
        assert all(torch.equal(got.masks[n], m) for n, m in want.masks.items())


def test_vit_at_another_resolution_interpolates_positions():
    model = _random(MODELS["ViTModel"][0]())
    result = prune(model, sparsity=0.5, calibration=images(1, size=48))
    assert len(result.masks) == 12


class Classifier(nn.Module):
    def __init__(self, vit, extra=False):
        super().__init__()
        self.backbone = vit
        self.head = nn.Linear(32, 4)
        if extra:
            self.adapter = nn.Linear(32, 32)


def test_a_wrapper_with_a_head_is_recognised_but_a_larger_model_is_not():
    vit = _random(MODELS["timm"][0]())
    wrapped = Classifier(vit)
    assert recognise_preset(wrapped) == "timm_vit"
    result = prune(wrapped, sparsity=0.5, calibration=images())
    assert "head.weight" in result.dense_layers and "backbone.head.weight" in result.dense_layers
    bare = prune(vit, sparsity=0.5, calibration=images())
    assert all(torch.equal(result.masks[f"backbone.{n}"], m) for n, m in bare.masks.items())
    # a Linear outside the ViT that is no head: the model is more than a ViT, so no vision preset is guessed
    assert recognise_preset(Classifier(vit, extra=True)) is None


def test_vision_transformers_of_two_families_in_one_model_are_an_error_naming_both():
    """A timm ViT teacher beside a torchvision ViT student: no preset is guessed, the error says where each sits."""
    both = nn.ModuleDict({"teacher": MODELS["timm"][0](), "student": MODELS["torchvision"][0]()})
    with pytest.raises(ValueError, match=r"vision transformers of several families .*teacher\. \(VisionTransformer\)"
                                         r".*student\. \(VisionTransformer\)"):
        recognise_preset(both)


def test_bad_batches_and_backbones_name_the_problem():
    with pytest.raises(KeyError, match="pixel_values"):
        images_of({"input_ids": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        images_of(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="not a supported vision transformer"):
        load_vision_backbone(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'family' must be one of"):
        load_vision_backbone({"family": "swin"})


def test_load_vision_backbone_unwraps_classifiers_and_freezes_unused_heads():
    encoder, family = load_vision_backbone(MODELS["ViTForImageClassification"][0]())
    assert type(encoder).__name__ == "ViTModel" and family.preset == "vit"
    timm_encoder, _ = load_vision_backbone(MODELS["timm"][0]())
    assert not timm_encoder.head.weight.requires_grad and timm_encoder.blocks[0].attn.qkv.weight.requires_grad
    tv, family = load_vision_backbone(MODELS["torchvision"][0]())
    assert not tv.heads.head.weight.requires_grad
    x = torch.randn(2, 3, SIZE, SIZE)
    assert family.features(tv, x).shape == (2, 32)
    # torchvision's features are its forward up to `heads`: with an identity head they agree
    tv.heads = nn.Identity()
    torch.testing.assert_close(family.features(tv.eval(), x), tv(x))
