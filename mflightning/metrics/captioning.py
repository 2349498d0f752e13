"""COCO caption metrics (BLEU@1-4, METEOR, ROUGE-L, CIDEr-D, optional SPICE) via pycocoevalcap.

Captions are lower-cased and tokenised with the Stanford PTB tokenizer (punctuation dropped),
as in the COCO caption evaluation. Scores are reported x100, the scale of the paper's tables.
METEOR, the tokenizer and SPICE run Java (17 works); SPICE also needs Stanford CoreNLP,
which pycocoevalcap downloads on first use, so it runs only on request and is skipped with a
logged warning when it fails.
"""

from __future__ import annotations

import logging
import math
import shutil
import socket
from collections.abc import Hashable, Mapping, Sequence

logger = logging.getLogger(__name__)

_SPICE_DOWNLOAD_TIMEOUT_S = 60.0


def _describe_ids(ids: list[Hashable], limit: int = 10) -> str:
    """Short listing of ids for error messages."""
    shown = ", ".join(repr(item) for item in ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _check_inputs(predictions: Mapping, references: Mapping) -> None:
    """Check types, non-empty texts and that both dicts have exactly the same ids."""
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise TypeError(
            "predictions and references must be dicts id -> caption and id -> list of captions, "
            f"got {type(predictions).__name__} and {type(references).__name__}"
        )
    if len(predictions) == 0:
        raise ValueError("no predictions to score: predictions is empty")
    missing_references = [key for key in predictions if key not in references]
    missing_predictions = [key for key in references if key not in predictions]
    if missing_references or missing_predictions:
        problems = []
        if missing_references:
            problems.append(
                f"ids without references: {_describe_ids(missing_references)}"
            )
        if missing_predictions:
            problems.append(
                f"ids without predictions: {_describe_ids(missing_predictions)}"
            )
        raise ValueError("prediction and reference ids differ; " + "; ".join(problems))
    for key, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"prediction for id {key!r} must be a str, got {caption!r}")
    for key, captions in references.items():
        if isinstance(captions, str) or not isinstance(captions, Sequence):
            raise TypeError(f"references for id {key!r} must be a list of str, got {captions!r}")
        if len(captions) == 0:
            raise ValueError(f"references for id {key!r} are empty")
        for position, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(
                    f"reference {position} for id {key!r} must be a non-empty str, got {caption!r}"
                )


def _one_line(text: str) -> str:
    """Collapse all whitespace (newlines included) so each caption is one tokenizer line."""
    return " ".join(text.split())


def _ptb_tokenize(captions: dict[Hashable, list[str]]) -> dict[Hashable, list[str]]:
    """PTB-tokenise every caption; empty captions stay empty and are not sent to Java."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    cleaned = {key: [_one_line(text) for text in texts] for key, texts in captions.items()}
    to_tokenize = {
        (key, position): [{"caption": text}]
        for key, texts in cleaned.items()
        for position, text in enumerate(texts)
        if text
    }
    tokenized = PTBTokenizer().tokenize(to_tokenize) if to_tokenize else {}
    if set(tokenized) != set(to_tokenize):
        lost = [key for key in to_tokenize if key not in tokenized]
        raise RuntimeError(
            f"PTB tokenizer returned {len(tokenized)} of {len(to_tokenize)} captions; "
            f"first lost: {to_tokenize[lost[0]][0]['caption']!r}"
        )
    return {
        key: [tokenized[(key, position)][0] if text else "" for position, text in enumerate(texts)]
        for key, texts in cleaned.items()
    }


def _meteor_score(gts: dict, res: dict) -> float:
    """Corpus METEOR; the Java process is stopped afterwards instead of waiting for GC."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
    finally:
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    return float(score)


def _spice_score(gts: dict, res: dict) -> float | None:
    """SPICE, or None with a logged warning when it cannot run (offline, CoreNLP missing...)."""
    previous_timeout = socket.getdefaulttimeout()
    try:
        from pycocoevalcap.spice.spice import Spice

        socket.setdefaulttimeout(_SPICE_DOWNLOAD_TIMEOUT_S)  # its CoreNLP download has none
        try:
            scorer = Spice()
        finally:
            socket.setdefaulttimeout(previous_timeout)
        score, _ = scorer.compute_score(gts, res)
        score = float(score)
    except Exception as error:  # noqa: BLE001 - any failure means "skip SPICE", reported below
        logger.warning("SPICE skipped: it failed to run (%s: %s)", type(error).__name__, error)
        return None
    if math.isnan(score):
        logger.warning("SPICE skipped: it returned NaN")
        return None
    return score


def caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    spice: bool = False,
    meteor: bool = True,
) -> dict[str, float]:
    """COCO caption metrics x100: bleu1-4, meteor, rouge_l, cider (+ spice when asked and it runs).

    `meteor=False` leaves METEOR out (its Java start-up loads paraphrase tables for several seconds):
    for quick checks; the key is then absent rather than a made-up value.
    """
    _check_inputs(predictions, references)
    if shutil.which("java") is None:
        raise RuntimeError("caption_scores needs Java (PTB tokenizer, METEOR): no `java` on PATH")
    empty = [key for key, caption in predictions.items() if not caption.strip()]
    if empty:
        logger.warning(
            "%d of %d predicted captions are empty (scored as empty): %s",
            len(empty), len(predictions), _describe_ids(empty),
        )

    # Re-key by position so that any hashable id works with the Java tools and JSON.
    ids = list(predictions)
    texts = {("ref", index): list(references[key]) for index, key in enumerate(ids)}
    texts.update({("pred", index): [predictions[key]] for index, key in enumerate(ids)})
    tokenized = _ptb_tokenize(texts)
    gts = {index: tokenized[("ref", index)] for index in range(len(ids))}
    res = {index: tokenized[("pred", index)] for index in range(len(ids))}

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"bleu{n}": float(value) for n, value in enumerate(bleu, start=1)}
    if meteor:
        scores["meteor"] = _meteor_score(gts, res)
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        spice_value = _spice_score(gts, res)
        if spice_value is not None:
            scores["spice"] = spice_value
    return {name: 100.0 * value for name, value in scores.items()}
