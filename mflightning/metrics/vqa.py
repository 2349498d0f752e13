"""VQA accuracy (VQA v2 protocol): answer normalisation and leave-one-out consensus accuracy.

Normalisation follows the published VQA evaluation steps, in this order:
1. every whitespace character becomes a space;
2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: if the text has a punctuation
   mark next to a space, or a comma between two digits ("1,000"), the marks are deleted,
   otherwise each mark becomes a space ("black-and-white" -> "black and white");
3. periods are deleted unless a digit follows ("dog." -> "dog", "2.5" stays);
4. lower-casing, then per word: number words zero..ten (and "none") become digits, the
   articles a/an/the are dropped, and contractions missing apostrophes are repaired
   ("dont" -> "don't", "shouldntve" -> "shouldn't've").

Deviations from the reference script, on purpose: it normalises the prediction only when the
human answers disagree and never applies step 4 to the human answers; here both sides are
always fully normalised, so "Yes" matches "yes" even when all humans agree.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# Contractions whose apostrophes annotators often drop. Forms whose apostrophe-free spelling is
# an ordinary word (we'll/well, it's/its, i'll/ill, she'd/shed, ...) are left out on purpose.
_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's
ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't
she'd've she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll
somebody's someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd they'd've they'll they're
they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd
where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
_REAL_WORDS = frozenset({"lets"})  # apostrophe-free variants that must stay as they are


def _contraction_repairs() -> dict[str, str]:
    """Map every spelling of each contraction with some apostrophes missing to the full form."""
    repairs = {}
    for full in _CONTRACTIONS:
        pieces = full.split("'")
        for kept in itertools.product((True, False), repeat=len(pieces) - 1):
            variant = pieces[0]
            for keep, piece in zip(kept, pieces[1:]):
                variant += ("'" if keep else "") + piece
            if variant != full and variant not in _REAL_WORDS:
                repairs[variant] = full
    return repairs


_CONTRACTION_REPAIRS = _contraction_repairs()


def _strip_punctuation(text: str) -> str:
    """Delete or space out punctuation as the VQA evaluation does, then drop periods."""
    delete_marks = _DIGIT_COMMA_DIGIT.search(text) is not None
    result = text
    for mark in _PUNCTUATION:
        if delete_marks or mark + " " in text or " " + mark in text:
            result = result.replace(mark, "")
        else:
            result = result.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", result)


def normalize_vqa_answer(answer: str) -> str:
    """Canonical form of a VQA answer so that equivalent spellings compare equal."""
    if not isinstance(answer, str):
        raise TypeError(f"a VQA answer must be a str, got {type(answer).__name__}: {answer!r}")
    text = "".join(" " if char.isspace() else char for char in answer).strip()
    text = _strip_punctuation(text)
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTION_REPAIRS.get(word, word))
    return " ".join(words)


def vqa_question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one prediction: mean over leave-one-out answer subsets of min(1, matches/3).

    With a single human answer no leave-one-out subset has anyone left, so exact match
    (1.0 or 0.0) is used instead, the usual metric for single-answer QA such as VG QA.
    """
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise TypeError(f"answers must be a list of strings, got {answers!r}")
    if len(answers) == 0:
        raise ValueError("answers is empty: at least one human answer is needed")
    predicted = normalize_vqa_answer(prediction)
    matches = sum(normalize_vqa_answer(answer) == predicted for answer in answers)
    if len(answers) == 1:
        return float(matches)
    # Leaving out a matching answer leaves matches - 1, leaving out another one leaves matches.
    total = matches * min(1.0, (matches - 1) / 3) + (len(answers) - matches) * min(1.0, matches / 3)
    return total / len(answers)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Official VQA accuracy in percent, averaged over questions."""
    if isinstance(predictions, str) or isinstance(answers, str):
        raise TypeError("predictions and answers must be lists (one entry per question), not str")
    if len(predictions) != len(answers):
        raise ValueError(
            f"{len(predictions)} predictions but {len(answers)} answer lists: one each per question"
        )
    if len(predictions) == 0:
        raise ValueError("no questions to score: predictions and answers are empty")
    total = 0.0
    for index, (prediction, human_answers) in enumerate(zip(predictions, answers)):
        try:
            total += vqa_question_accuracy(prediction, human_answers)
        except (TypeError, ValueError) as error:
            raise type(error)(f"question {index}: {error}") from error
    return 100.0 * total / len(predictions)
