"""Recall@K for retrieval: hand-computed ranks, tie handling, extremes and input validation."""

import numpy as np
import pytest
import torch

import mflightning.metrics.retrieval as retrieval_module
from mflightning.metrics import retrieval_ranks, retrieval_recall

# 3 images with 2 captions each; text j belongs to image j // 2.
TXT2IMG = [0, 0, 1, 1, 2, 2]
IMG2TXT = [[0, 1], [2, 3], [4, 5]]
SCORES = torch.tensor(
    [
        [0.1, 0.9, 0.9, 0.3, 0.2, 0.0],  # best caption (text 1) ties with wrong text 2 -> rank 1
        [0.8, 0.1, 0.5, 0.2, 0.6, 0.7],  # best caption (text 2, 0.5) beaten by texts 0, 4, 5 -> 3
        [0.4, 0.4, 0.4, 0.4, 0.4, 0.4],  # all tied: 4 wrong texts count against it -> rank 4
    ]
)


def test_hand_computed_ranks_with_several_captions_and_ties():
    image_ranks, text_ranks = retrieval_ranks(SCORES, TXT2IMG, IMG2TXT)
    assert image_ranks.tolist() == [1, 3, 4]
    # Columns: text 0 gt 0.1 vs (0.8, 0.4) -> 2; text 1 gt 0.9 -> 0; text 2 gt 0.5 vs 0.9, 0.4 -> 1;
    # text 3 gt 0.2 vs 0.3, 0.4 -> 2; text 4 gt 0.4 vs 0.2, 0.6 -> 1; text 5 gt 0.4 vs 0.0, 0.7 -> 1.
    assert text_ranks.tolist() == [2, 0, 1, 2, 1, 1]


def test_hand_computed_recall_values():
    result = retrieval_recall(SCORES, TXT2IMG, IMG2TXT)
    assert set(result) == {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
    assert result["txt_r1"] == 0.0
    assert result["txt_r5"] == 100.0 and result["txt_r10"] == 100.0
    assert result["img_r1"] == pytest.approx(100.0 / 6)
    assert result["img_r5"] == 100.0 and result["img_r10"] == 100.0
    assert result["r_mean"] == pytest.approx((0 + 100 + 100 + 100 / 6 + 100 + 100) / 6)
    assert all(isinstance(value, float) for value in result.values())


def test_tie_between_two_ground_truth_captions_does_not_count_against_them():
    scores = torch.tensor([[0.9, 0.9, 0.1], [0.2, 0.2, 0.8]])
    image_ranks, _ = retrieval_ranks(scores, [0, 0, 1], [[0, 1], [2]])
    assert image_ranks.tolist() == [0, 0]


def test_perfect_ranking_gives_100_everywhere():
    n_images, captions_per_image = 4, 3
    txt2img = [j // captions_per_image for j in range(n_images * captions_per_image)]
    img2txt = [list(range(i * captions_per_image, (i + 1) * captions_per_image)) for i in range(n_images)]
    scores = torch.tensor([[1.0 if txt2img[j] == i else 0.0 for j in range(len(txt2img))] for i in range(n_images)])
    result = retrieval_recall(scores, txt2img, img2txt)
    assert result == {key: 100.0 for key in result}


def test_worst_ranking_gives_0_when_more_than_10_candidates():
    n = 12
    scores = -torch.eye(n)  # every ground truth scores strictly lowest
    image_ranks, text_ranks = retrieval_ranks(scores, list(range(n)), [[i] for i in range(n)])
    assert image_ranks.tolist() == [n - 1] * n and text_ranks.tolist() == [n - 1] * n
    result = retrieval_recall(scores, list(range(n)), [[i] for i in range(n)])
    assert result == {key: 0.0 for key in result}


def test_recall_at_5_and_10_boundaries():
    # 12 single-caption images; image i has exactly i wrong texts above its caption -> rank i.
    n = 12
    scores = np.zeros((n, n))
    for i in range(n):
        scores[i, i] = 0.5
        wrong = [j for j in range(n) if j != i][:i]
        scores[i, wrong] = 1.0
    image_ranks, _ = retrieval_ranks(scores, list(range(n)), [[i] for i in range(n)])
    assert image_ranks.tolist() == list(range(n))
    result = retrieval_recall(scores, list(range(n)), [[i] for i in range(n)])
    assert result["txt_r1"] == pytest.approx(100 / 12)
    assert result["txt_r5"] == pytest.approx(500 / 12)
    assert result["txt_r10"] == pytest.approx(1000 / 12)


def _reference_ranks(scores, txt2img, img2txt):
    """Independent definition: sort candidates by score, ties put the ground truth last."""
    image_ranks = []
    for i, texts in enumerate(img2txt):
        order = sorted(range(scores.shape[1]), key=lambda j: (-scores[i, j], j in texts))
        image_ranks.append(min(order.index(j) for j in texts))
    text_ranks = []
    for j, image in enumerate(txt2img):
        order = sorted(range(scores.shape[0]), key=lambda i: (-scores[i, j], i == image))
        text_ranks.append(order.index(image))
    return image_ranks, text_ranks


def test_matches_sort_based_definition_on_random_tied_scores_across_chunks(monkeypatch):
    monkeypatch.setattr(retrieval_module, "_ROW_CHUNK", 3)  # exercise the chunked loop
    generator = np.random.default_rng(0)
    n_images = 8
    txt2img = [int(x) for x in generator.permutation(np.repeat(np.arange(n_images), [1, 2, 3, 1, 2, 5, 1, 2]))]
    img2txt = [[j for j, image in enumerate(txt2img) if image == i] for i in range(n_images)]
    scores = generator.integers(0, 4, size=(n_images, len(txt2img))).astype(np.float32)  # many ties
    image_ranks, text_ranks = retrieval_ranks(scores, txt2img, img2txt)
    expected_image, expected_text = _reference_ranks(scores, txt2img, img2txt)
    assert image_ranks.tolist() == expected_image
    assert text_ranks.tolist() == expected_text


def test_accepts_numpy_tensors_and_integer_scores_alike():
    expected = retrieval_recall(SCORES, TXT2IMG, IMG2TXT)
    assert retrieval_recall(SCORES.numpy(), np.array(TXT2IMG), IMG2TXT) == expected
    assert retrieval_recall(SCORES.double(), torch.tensor(TXT2IMG), [torch.tensor(t) for t in IMG2TXT]) == expected
    integer_scores = (SCORES * 10).round().long()
    assert retrieval_recall(integer_scores, TXT2IMG, IMG2TXT) == expected


@pytest.mark.parametrize(
    "scores, txt2img, img2txt, message",
    [
        (torch.zeros(6), TXT2IMG, IMG2TXT, "must be 2-D"),
        (torch.zeros(0, 6), TXT2IMG, IMG2TXT, "empty"),
        (SCORES, TXT2IMG[:5], IMG2TXT, "txt2img has 5 entries but scores_i2t has 6"),
        (SCORES, TXT2IMG, IMG2TXT[:2], "img2txt has 2 entries but scores_i2t has 3"),
        (SCORES, [0, 0, 1, 1, 2, 3], IMG2TXT, r"txt2img\[5\] = 3 is out of range for 3 images"),
        (SCORES, [0, 0, 1, 1, 2, -1], IMG2TXT, r"txt2img\[5\] = -1 is out of range"),
        (SCORES, TXT2IMG, [[0, 1], [2, 3], [4, 6]], r"img2txt\[2\] holds text index 6, out of range"),
        (SCORES, [0, 0, 1, 1, 1, 1], [[0, 1], [2, 3, 4, 5], []], r"img2txt\[2\] is empty"),
        (SCORES, TXT2IMG, [[0, 1], [2, 4], [3, 5]], r"img2txt\[1\] lists text 4, but txt2img\[4\] = 2"),
        (SCORES, TXT2IMG, [[0, 1], [2, 3], [4]], "1 text\\(s\\) are missing from img2txt, first: text 5"),
        (SCORES, TXT2IMG, [[0, 1, 1], [2, 3], [4, 5]], "text 1 is listed more than once"),
    ],
)
def test_invalid_inputs_raise_clear_value_errors(scores, txt2img, img2txt, message):
    with pytest.raises(ValueError, match=message):
        retrieval_recall(scores, txt2img, img2txt)


def test_nan_scores_are_rejected_with_position():
    scores = SCORES.clone()
    scores[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN value\(s\), first at \[image 1, text 4\]"):
        retrieval_recall(scores, TXT2IMG, IMG2TXT)


def test_non_integer_indices_and_wrong_types_raise_type_errors():
    with pytest.raises(TypeError, match=r"txt2img\[1\] must be an integer index, got 0.5"):
        retrieval_recall(SCORES, [0, 0.5, 1, 1, 2, 2], IMG2TXT)
    with pytest.raises(TypeError, match="scores_i2t must be a torch.Tensor or numpy.ndarray"):
        retrieval_recall(SCORES.tolist(), TXT2IMG, IMG2TXT)
    with pytest.raises(TypeError, match=r"img2txt\[0\] must be a list of text indices"):
        retrieval_recall(SCORES, TXT2IMG, [0, [2, 3], [4, 5]])
