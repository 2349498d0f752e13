"""The backbone interface the task modules are written against (``VisionLanguageBackbone``).

A task module (``mflightning.tasks``) never asks which backbone it holds: it calls the members
declared here, and each backbone (``BlipBackbone``, ``XVLMBackbone``) implements them its own way
(e.g. BLIP re-encodes a text with its grounded encoder for ITM, XVLM runs its fusion encoder on
the text encoder's states). A new backbone that implements these members, as an ``nn.Module``,
serves the retrieval, captioning and VQA modules unchanged.

Conventions every member follows:
- texts are tokenized by the task's tokenizer and start with ``[CLS]``; a backbone that wants
  another first token for its image-grounded encoder or its decoder names it in ``enc_token_id``
  / ``dec_token_id`` (None: keep ``[CLS]``), and callers apply it with ``with_first_token``;
- ``image_embeds`` are the image encoder's tokens ``(B, 1+P, D)``, first token the image [CLS];
- logits are ``(B, L, V)``, ITM logits ``(B, 2)`` in fp32 with class 1 = "match".
"""
from __future__ import annotations

import inspect
from typing import Any, Iterator, Literal, Protocol, runtime_checkable

import torch
from torch import nn

Task = Literal["retrieval", "captioning", "vqa"]
TASKS: tuple[str, ...] = ("retrieval", "captioning", "vqa")


@runtime_checkable
class VisionLanguageBackbone(Protocol):
    """What the retrieval, captioning and VQA modules use from a backbone (an ``nn.Module``)."""

    #: Name of the pruning preset (``mflightning.pruning.presets``) that groups this backbone's layers.
    pruning_preset: str
    #: ITC temperature; the ITC loss clamps it to [0.001, 0.5] in place before each use.
    temp: nn.Parameter
    #: The ``pretraining_losses`` whose sum SNIP differentiates (the MULTIFLOW code's pruning loss).
    pruning_loss_terms: tuple[str, ...]

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_spec(cls, spec: Any, tokenizer: Any, **options: Any) -> "VisionLanguageBackbone":
        """A backbone in its fine-tuning layout from a checkpoint path/name, a config dict (vocabulary and
        special token ids default to the tokenizer's) or an instance; checked against the tokenizer."""
        ...

    def unused_parts(self, task: str) -> tuple[str, ...]:
        """Parameter-name prefixes ``task`` never runs in training (the task module freezes them)."""
        ...

    def add_decoder_(self) -> "VisionLanguageBackbone":
        """Make sure the answer decoder ``decode`` needs exists (VQA); returns self."""
        ...

    # ----------------------------------------------------------------- token conventions
    @property
    def enc_token_id(self) -> int | None:
        """First token of texts given to ``encode_grounded`` / ``match_logits`` (None: keep [CLS])."""
        ...

    @property
    def dec_token_id(self) -> int | None:
        """First token of texts given to ``decode`` / ``caption_logits`` / ``generate_caption`` (None: [CLS])."""
        ...

    # ----------------------------------------------------------------- encoders and heads
    def __call__(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 **batch: Any) -> dict:
        """Calibration forward: runs every prunable layer once on an image-caption batch."""
        ...

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image tokens ``(B, 1+P, D)`` of images ``(B, 3, H, W)``."""
        ...

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unimodal (image-free, bidirectional) text states ``(B, L, D)``."""
        ...

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC image embeddings ``(B, E)`` (fp32): the image projection."""
        ...

    def text_features(self, text_states: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC text embeddings ``(B, E)`` (fp32) of ``encode_text`` states: the text projection."""
        ...

    def encode_grounded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, encoder_states: torch.Tensor,
                        encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Image-grounded text states ``(B, L, D)``: the text cross-attending to ``encoder_states``."""
        ...

    def match_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
                     text_states: torch.Tensor | None = None) -> torch.Tensor:
        """ITM logits ``(B, 2)`` of text b with image b. ``text_states``: the texts' ``encode_text`` states
        when the caller has them (a backbone whose ITM reads them reuses them instead of re-encoding). A
        backbone whose ITM never reads them may say so with ``match_reads_text_states = False`` (BLIP):
        retrieval training then does not gather them across processes."""
        ...

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, encoder_states: torch.Tensor,
               encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal LM logits ``(B, L, V)`` of the answer decoder attending to ``encoder_states``."""
        ...

    def caption_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       image_embeds: torch.Tensor) -> torch.Tensor:
        """Causal LM logits ``(B, L, V)`` of captions conditioned on the image."""
        ...

    def generate_caption(self, prompt_ids: torch.Tensor, image_embeds: torch.Tensor, *, num_beams: int,
                         min_length: int, max_length: int, eos_token_id: int, pad_token_id: int,
                         repetition_penalty: float = 1.0, length_normalisation: str = "generated") -> list[list[int]]:
        """Beam-search continuations of ``prompt_ids`` ``(B, P)`` (lengths count the prompt): the generated
        ids of each image, prompt removed (padding/eos may remain; decode with ``skip_special_tokens``).
        ``length_normalisation``: ``"generated"`` or ``"sequence"`` (``mflightning.models.generation``)."""
        ...

    def pretraining_losses(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           image_idx: torch.Tensor, tokenizer: Any) -> dict[str, torch.Tensor]:
        """The backbone's pretraining losses by name on an image-caption batch (ITC, ITM, LM / MLM)."""
        ...

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """As ``nn.Module.named_parameters``: the task module freezes ``unused_parts`` through it."""
        ...


def with_first_token(input_ids: torch.Tensor, token_id: int | None) -> torch.Tensor:
    """Copy of ``input_ids`` whose first token is ``token_id`` (e.g. BLIP's [ENC] / [DEC] replace
    [CLS]); ``None`` keeps each text's own first token."""
    out = input_ids.clone()
    if token_id is not None:
        out[:, 0] = token_id
    return out


def missing_members(obj: Any) -> list[str]:
    """Members of ``VisionLanguageBackbone`` that ``obj`` lacks (empty when it satisfies the interface)."""
    return [name for name in interface_members() if not hasattr(obj, name)]


def interface_members() -> list[str]:
    """Names the protocol declares (attributes, properties, methods), in declaration order."""
    own = [name for name in VisionLanguageBackbone.__dict__ if not name.startswith("_") or name == "__call__"]
    hints = list(getattr(VisionLanguageBackbone, "__annotations__", {}))
    return hints + [name for name in own if name not in hints and _is_member(name)]


def _is_member(name: str) -> bool:
    value = inspect.getattr_static(VisionLanguageBackbone, name)
    return isinstance(value, (property, classmethod, staticmethod)) or inspect.isfunction(value)


def require_backbone(obj: Any, what: str = "backbone") -> None:
    """Raise a TypeError naming the interface members ``obj`` lacks."""
    missing = missing_members(obj)
    if missing:
        raise TypeError(f"{what} {type(obj).__name__} does not implement VisionLanguageBackbone: "
                        f"it lacks {missing} (see mflightning/models/interface.py)")


__all__ = ["TASKS", "Task", "VisionLanguageBackbone", "interface_members", "missing_members", "require_backbone",
           "with_first_token"]
