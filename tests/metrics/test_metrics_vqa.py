"""VQA accuracy: leave-one-out consensus values computed by hand and answer normalisation."""

import pytest

from mflightning.metrics import normalize_vqa_answer, vqa_accuracy, vqa_question_accuracy


def _humans(n_matching: int, total: int = 10) -> list[str]:
    """Human answers: n_matching times "cat", the rest "dog"."""
    return ["cat"] * n_matching + ["dog"] * (total - n_matching)


@pytest.mark.parametrize(
    "n_matching, expected",
    [
        # Leave out one of the m matching answers -> m-1 left; leave out another -> m left.
        (0, 0.0),
        (1, 30.0),  # (1 * min(1, 0/3) + 9 * min(1, 1/3)) / 10 = 3/10
        (2, 60.0),  # (2 * 1/3 + 8 * 2/3) / 10 = 6/10
        (3, 90.0),  # (3 * 2/3 + 7 * 1) / 10 = 9/10: three humans are not quite enough
        (4, 100.0),  # (4 * 1 + 6 * 1) / 10
        (10, 100.0),
    ],
)
def test_leave_one_out_accuracy_for_ten_human_answers(n_matching, expected):
    assert vqa_accuracy(["cat"], [_humans(n_matching)]) == pytest.approx(expected, abs=1e-9)


def test_leave_one_out_with_other_answer_counts():
    # 5 humans, 2 match: 2 subsets keep 1 match (1/3), 3 subsets keep 2 (2/3) -> (2/3 + 2) / 5.
    assert vqa_question_accuracy("cat", _humans(2, total=5)) == pytest.approx((2 / 3 + 2) / 5)
    # 2 humans, both match: each subset keeps 1 match -> 1/3.
    assert vqa_question_accuracy("cat", ["cat", "cat"]) == pytest.approx(1 / 3)


def test_single_human_answer_is_exact_match():
    assert vqa_question_accuracy("Two", ["2"]) == 1.0
    assert vqa_question_accuracy("3", ["2"]) == 0.0


def test_accuracy_is_averaged_over_questions():
    predictions = ["cat", "yes", "red"]
    answers = [_humans(1), ["yes"] * 10, ["blue"] * 10]
    assert vqa_accuracy(predictions, answers) == pytest.approx((30 + 100 + 0) / 3)


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("dont", "don't"),
        ("yes!", "yes"),
        ("  A  Red\tCar \n", "red car"),
        ("An apple", "apple"),
        ("none", "0"),
        ("ten", "10"),
        ("black-and-white", "black and white"),  # no mark next to a space: marks become spaces
        ("hot dog, pizza", "hot dog pizza"),  # ", " present: marks are deleted
        ("1,000", "1000"),  # comma between digits: marks are deleted
        ("2.5", "2.5"),  # a period before a digit stays
        ("shouldntve", "shouldn't've"),
        ("whats", "what's"),
        ("lets", "lets"),  # an ordinary word, not a broken "let's"
        ("its", "its"),
    ],
)
def test_normalize_vqa_answer(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


@pytest.mark.parametrize(
    "prediction, human",
    [("Two", "2"), ("the dog.", "dog"), ("dont", "don't"), ("yes!", "yes"), ("2", "two")],
)
def test_normalisation_applies_to_prediction_and_humans(prediction, human):
    assert vqa_accuracy([prediction], [[human] * 10]) == pytest.approx(100.0)


def test_invalid_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 answer lists"):
        vqa_accuracy(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="question 1: answers is empty"):
        vqa_accuracy(["a", "b"], [["a"], []])
    with pytest.raises(TypeError, match="question 0: answers must be a list of strings"):
        vqa_accuracy(["a"], ["a"])
    with pytest.raises(TypeError, match="question 0: a VQA answer must be a str, got NoneType"):
        vqa_accuracy([None], [["a"]])
    with pytest.raises(ValueError, match="no questions to score"):
        vqa_accuracy([], [])
