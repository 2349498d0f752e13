"""A BLIP-shaped vision-language model with random weights, for cost benchmarks.

Vision: BLIP's ViT (transformers `BlipVisionModel`); text: BLIP's image-grounded BERT encoder with
cross-attention (`BlipTextModel`). At `base` size this is BLIP-base's encoder pair: about 200M
prunable nn.Linear weights. No download: weights are random, which is all cost measurements need.
"""
from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

BLIP_GROUPS = {"vision": r"(^|\.)vision\.", "text": r"(^|\.)text\."}
HEADS = (r"(^|\.)itm_head\.",)


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    image_size: int
    patch: int
    text_len: int = 30
    vocab: int = 30524
    mlp_ratio: float = 4.0


SHAPES = {
    "base": Shape(hidden=768, layers=12, heads=12, image_size=224, patch=16),
    "small": Shape(hidden=256, layers=4, heads=4, image_size=96, patch=16, vocab=4000),
    "tiny": Shape(hidden=32, layers=1, heads=2, image_size=32, patch=16, text_len=8, vocab=100),
    # the encoder pair of the demo's small BLIP (the quality benchmark's: mflightning.demo.DemoSettings)
    "demo": Shape(hidden=64, layers=2, heads=2, image_size=32, patch=8, text_len=30, vocab=78, mlp_ratio=2.0),
    # the demo's model until issue 13 made the demo a cell of the quality benchmark (the "demo" rows of the
    # earlier runs in docs/benchmarks/cost.md)
    "demo128": Shape(hidden=128, layers=2, heads=4, image_size=64, patch=8, text_len=30, vocab=300, mlp_ratio=3.0),
}


class BlipShaped(nn.Module):
    """Image encoder + image-grounded text encoder + ITM head (the ITM forward of BLIP)."""

    def __init__(self, shape: Shape):
        super().__init__()
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.vision = BlipVisionModel(
            BlipVisionConfig(
                hidden_size=shape.hidden, intermediate_size=int(shape.mlp_ratio * shape.hidden), num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, image_size=shape.image_size, patch_size=shape.patch,
            )
        )
        self.text = BlipTextModel(
            BlipTextConfig(
                vocab_size=shape.vocab, hidden_size=shape.hidden, encoder_hidden_size=shape.hidden,
                intermediate_size=int(shape.mlp_ratio * shape.hidden), num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, max_position_embeddings=64,
            ),
            add_pooling_layer=False,
        )
        self.itm_head = nn.Linear(shape.hidden, 2)
        # BLIP's vision config initialises with std 1e-10; pretrained weights look like std ~0.02,
        # and cubic MultiFlow scores of 1e-10 weights would underflow fp32 into ties
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, 0.02)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=image).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        text = self.text(
            input_ids=input_ids, attention_mask=attention_mask,
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
        ).last_hidden_state
        return self.itm_head(text[:, 0])


def make_batch(shape: Shape, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shape.text_len // 2, shape.text_len + 1, (batch_size,), generator=g)
    mask = (torch.arange(shape.text_len).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return {
        "image": torch.randn(batch_size, 3, shape.image_size, shape.image_size, generator=g),
        "input_ids": torch.randint(1, shape.vocab, (batch_size, shape.text_len), generator=g) * mask,
        "attention_mask": mask,
        "label": torch.randint(0, 2, (batch_size,), generator=g),
    }


class BlipShapedModule(L.LightningModule):
    """ITM classification on random data: a stand-in training step of BLIP's size."""

    def __init__(self, shape: Shape, lr: float = 1e-5):
        super().__init__()
        self.model = BlipShaped(shape)
        self.lr = lr

    def calibration_step(self, batch: dict) -> None:
        self.model(batch["image"], batch["input_ids"], batch["attention_mask"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["image"], batch["input_ids"], batch["attention_mask"])
        return nn.functional.cross_entropy(logits.float(), batch["label"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
