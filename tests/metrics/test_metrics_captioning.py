"""Caption scores: sanity on identical captions, agreement with pycocoevalcap, SPICE skip, id checks.

The Java tools start slowly, so caption_scores runs twice for the whole module (fixtures).
"""

import logging

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

import pycocoevalcap.spice.spice as spice_module
from mflightning.metrics import caption_scores

REFERENCES = {
    "img1": ["A dog runs across the green grass.", "A brown dog running in a park"],
    7: ["A cat sits on a red mat", "a small cat, sitting on a mat."],
    "img3": ["Two birds fly over the sea", "Birds flying above the ocean"],
    "img4": ["A man rides a bicycle down the street"],
}
MIXED_PREDICTIONS = {
    "img1": "a dog running on the grass",
    7: "A cat on a mat!",
    "img3": "",  # empty prediction: scored, with a warning
    "img4": "a man riding a bike on a street",
}
KEYS = ["bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"]


class _RecordingHandler(logging.Handler):
    """Keeps log records (caplog is function-scoped, the fixtures are module-scoped)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class _OfflineSpice:
    """Stands in for pycocoevalcap's Spice when its CoreNLP download fails (no network)."""

    def __init__(self):
        raise OSError("cannot download Stanford CoreNLP")


@pytest.fixture(scope="module")
def identical_scores():
    predictions = {key: refs[0] for key, refs in REFERENCES.items()}
    return caption_scores(predictions, REFERENCES)


@pytest.fixture(scope="module")
def mixed_run():
    handler = _RecordingHandler()
    logger = logging.getLogger("mflightning.metrics.captioning")
    logger.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(spice_module, "Spice", _OfflineSpice)
            scores = caption_scores(MIXED_PREDICTIONS, REFERENCES, spice=True)
    finally:
        logger.removeHandler(handler)
    return scores, handler.messages


def test_identical_captions_score_near_100(identical_scores):
    assert list(identical_scores) == KEYS
    for key in ["bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l"]:
        assert identical_scores[key] == pytest.approx(100.0, abs=1e-4), key
    assert identical_scores["cider"] > 100.0  # x100 scale; n-grams unique to one image weigh in


def test_mixed_case_matches_pycocoevalcap_directly(mixed_run):
    scores, _ = mixed_run
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({key: [{"caption": c} for c in refs] for key, refs in REFERENCES.items()})
    res = tokenizer.tokenize({key: [{"caption": c}] for key, c in MIXED_PREDICTIONS.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {f"bleu{n}": 100 * value for n, value in enumerate(bleu, start=1)}
    expected["rouge_l"] = 100 * Rouge().compute_score(gts, res)[0]
    expected["cider"] = 100 * Cider().compute_score(gts, res)[0]
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, rel=1e-9), key
    assert 0.0 < scores["bleu4"] < 100.0 and 0.0 < scores["cider"]
    assert 0.0 < scores["meteor"] < 100.0


def test_failing_spice_is_skipped_with_warning(mixed_run):
    scores, messages = mixed_run
    assert list(scores) == KEYS  # no "spice" key
    assert any("SPICE skipped" in m and "cannot download Stanford CoreNLP" in m for m in messages)


def test_empty_prediction_is_scored_and_reported(mixed_run):
    _, messages = mixed_run
    assert any("1 of 4 predicted captions are empty" in m and "'img3'" in m for m in messages)


def test_id_mismatch_names_the_missing_ids():
    predictions = {"img1": "a dog", "extra": "a cat"}
    references = {"img1": ["a dog"], "img9": ["a bird"]}
    with pytest.raises(ValueError, match=r"ids without references: 'extra'; ids without predictions: 'img9'"):
        caption_scores(predictions, references)


def test_malformed_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="no predictions to score"):
        caption_scores({}, {})
    with pytest.raises(TypeError, match="references for id 'a' must be a list of str"):
        caption_scores({"a": "a dog"}, {"a": "a dog"})
    with pytest.raises(ValueError, match="references for id 'a' are empty"):
        caption_scores({"a": "a dog"}, {"a": []})
    with pytest.raises(ValueError, match="reference 1 for id 'a' must be a non-empty str"):
        caption_scores({"a": "a dog"}, {"a": ["a dog", " "]})
    with pytest.raises(TypeError, match="prediction for id 'a' must be a str"):
        caption_scores({"a": None}, {"a": ["a dog"]})


def test_meteor_can_be_left_out_without_changing_the_rest(mixed_run):
    scores, _ = mixed_run
    quick = caption_scores(MIXED_PREDICTIONS, REFERENCES, meteor=False)
    assert "meteor" not in quick
    assert quick == {key: value for key, value in scores.items() if key != "meteor"}
