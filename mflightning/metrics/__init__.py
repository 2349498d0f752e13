"""Evaluation metrics for the downstream tasks: retrieval recall, VQA accuracy, caption scores."""

from mflightning.metrics.captioning import caption_scores
from mflightning.metrics.retrieval import retrieval_ranks, retrieval_recall
from mflightning.metrics.vqa import normalize_vqa_answer, vqa_accuracy, vqa_question_accuracy

__all__ = [
    "caption_scores",
    "normalize_vqa_answer",
    "retrieval_ranks",
    "retrieval_recall",
    "vqa_accuracy",
    "vqa_question_accuracy",
]
