"""Recall@K for image-text retrieval (image-to-text and text-to-image) from a score matrix.

Tie handling (deterministic, pessimistic): ties are broken against the ground truth. The
rank of a ground-truth item is the number of *wrong* candidates whose score is greater than
or equal to its score (0 = retrieved first). For image-to-text, an image's rank is that of its
best-scoring caption; its other captions never count as competitors. A score matrix of
constants therefore gets rank n_candidates - n_ground_truth, never a lucky rank 0.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

RECALL_KS = (1, 5, 10)
_ROW_CHUNK = 1024  # rows of the score matrix compared at once, to bound memory on 5k x 25k


def _as_score_matrix(scores_i2t: Any) -> torch.Tensor:
    """Turn a tensor or array into a 2-D floating tensor and reject NaN scores."""
    if isinstance(scores_i2t, np.ndarray):
        scores = torch.from_numpy(scores_i2t)
    elif isinstance(scores_i2t, torch.Tensor):
        scores = scores_i2t.detach()
    else:
        raise TypeError(
            f"scores_i2t must be a torch.Tensor or numpy.ndarray, got {type(scores_i2t).__name__}"
        )
    if scores.dim() != 2:
        raise ValueError(
            f"scores_i2t must be 2-D [n_images, n_texts], got shape {tuple(scores.shape)}"
        )
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores_i2t is empty: shape {tuple(scores.shape)}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise TypeError(f"scores_i2t must hold real numbers, got dtype {scores.dtype}")
    if not scores.is_floating_point():
        scores = scores.double()
    nan_positions = torch.isnan(scores).nonzero()
    if len(nan_positions) > 0:
        image_index, text_index = nan_positions[0].tolist()
        raise ValueError(
            f"scores_i2t holds {len(nan_positions)} NaN value(s), first at "
            f"[image {image_index}, text {text_index}]"
        )
    return scores


def _as_index(value: Any, what: str) -> int:
    """Read one integer index (int, numpy integer or 0-d integer tensor); reject bools and floats."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be an integer index, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer index, got {value!r}") from None


def _check_txt2img(txt2img: Any, n_images: int, n_texts: int) -> list[int]:
    """Validate the text -> image index list against the score matrix shape."""
    if isinstance(txt2img, (torch.Tensor, np.ndarray)):
        if txt2img.ndim != 1:
            raise ValueError(f"txt2img must be 1-D, got shape {tuple(txt2img.shape)}")
        txt2img = txt2img.tolist()
    if not isinstance(txt2img, Sequence) or isinstance(txt2img, str):
        raise TypeError(f"txt2img must be a sequence of ints, got {type(txt2img).__name__}")
    if len(txt2img) != n_texts:
        raise ValueError(
            f"txt2img has {len(txt2img)} entries but scores_i2t has {n_texts} text columns"
        )
    image_of_text = []
    for text_index, value in enumerate(txt2img):
        image_index = _as_index(value, f"txt2img[{text_index}]")
        if not 0 <= image_index < n_images:
            raise ValueError(
                f"txt2img[{text_index}] = {image_index} is out of range for {n_images} images"
            )
        image_of_text.append(image_index)
    return image_of_text


def _check_img2txt(img2txt: Any, image_of_text: list[int], n_images: int) -> None:
    """Validate the image -> captions lists and check they agree exactly with txt2img."""
    if not isinstance(img2txt, Sequence) or isinstance(img2txt, str):
        raise TypeError(f"img2txt must be a sequence of lists, got {type(img2txt).__name__}")
    if len(img2txt) != n_images:
        raise ValueError(
            f"img2txt has {len(img2txt)} entries but scores_i2t has {n_images} image rows"
        )
    n_texts = len(image_of_text)
    seen = [False] * n_texts
    for image_index, texts in enumerate(img2txt):
        if isinstance(texts, (torch.Tensor, np.ndarray)):
            texts = texts.reshape(-1).tolist()
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(
                f"img2txt[{image_index}] must be a list of text indices, got {texts!r}"
            )
        if len(texts) == 0:
            raise ValueError(f"img2txt[{image_index}] is empty: image {image_index} has no caption")
        for value in texts:
            text_index = _as_index(value, f"img2txt[{image_index}] entry")
            if not 0 <= text_index < n_texts:
                raise ValueError(
                    f"img2txt[{image_index}] holds text index {text_index}, out of range for "
                    f"{n_texts} texts"
                )
            if seen[text_index]:
                raise ValueError(
                    f"text {text_index} is listed more than once in img2txt "
                    f"(again in img2txt[{image_index}])"
                )
            seen[text_index] = True
            if image_of_text[text_index] != image_index:
                raise ValueError(
                    f"img2txt[{image_index}] lists text {text_index}, but "
                    f"txt2img[{text_index}] = {image_of_text[text_index]}"
                )
    missing = [index for index, was_seen in enumerate(seen) if not was_seen]
    if missing:
        raise ValueError(
            f"{len(missing)} text(s) are missing from img2txt, first: text {missing[0]} "
            f"(txt2img says image {image_of_text[missing[0]]})"
        )


def retrieval_ranks(
    scores_i2t: torch.Tensor | np.ndarray,
    txt2img: Sequence[int] | torch.Tensor | np.ndarray,
    img2txt: Sequence[Sequence[int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the ground truth: (per image for image-to-text, per text for text-to-image)."""
    scores = _as_score_matrix(scores_i2t)
    n_images, n_texts = scores.shape
    image_of_text = _check_txt2img(txt2img, n_images, n_texts)
    _check_img2txt(img2txt, image_of_text, n_images)

    device = scores.device
    text_image = torch.tensor(image_of_text, dtype=torch.long, device=device)
    text_positions = torch.arange(n_texts, device=device)
    ground_truth_score = scores[text_image, text_positions]  # score of each text with its image
    image_ranks = torch.empty(n_images, dtype=torch.long, device=device)
    text_ranks = torch.zeros(n_texts, dtype=torch.long, device=device)
    for start in range(0, n_images, _ROW_CHUNK):
        rows = scores[start : start + _ROW_CHUNK]
        row_images = torch.arange(start, start + rows.shape[0], device=device)
        is_match = text_image.unsqueeze(0) == row_images.unsqueeze(1)
        best_match = rows.masked_fill(~is_match, float("-inf")).amax(dim=1, keepdim=True)
        # Image-to-text: wrong captions scoring >= the image's best caption.
        image_ranks[start : start + rows.shape[0]] = ((rows >= best_match) & ~is_match).sum(1)
        # Text-to-image: wrong images (in this chunk) scoring >= the text's own image.
        text_ranks += ((rows >= ground_truth_score.unsqueeze(0)) & ~is_match).sum(0)
    return image_ranks.cpu(), text_ranks.cpu()


def _recall_percent(ranks: torch.Tensor, k: int) -> float:
    """Percentage of queries whose ground truth is within the top k."""
    return float((ranks < k).double().mean().item() * 100.0)


def retrieval_recall(
    scores_i2t: torch.Tensor | np.ndarray,
    txt2img: Sequence[int] | torch.Tensor | np.ndarray,
    img2txt: Sequence[Sequence[int]],
) -> dict[str, float]:
    """Recall@1/5/10 in percent for text retrieval (txt_r*), image retrieval (img_r*) and their mean."""
    image_ranks, text_ranks = retrieval_ranks(scores_i2t, txt2img, img2txt)
    result = {f"txt_r{k}": _recall_percent(image_ranks, k) for k in RECALL_KS}
    result.update({f"img_r{k}": _recall_percent(text_ranks, k) for k in RECALL_KS})
    result["r_mean"] = sum(result.values()) / len(result)
    return result
