"""Downstream tasks (LightningModules) on the BLIP backbone: retrieval, captioning, VQA."""
from mflightning.tasks.base import BlipTaskModule
from mflightning.tasks.captioning import CaptioningModule
from mflightning.tasks.retrieval import RetrievalModule
from mflightning.tasks.vqa import VQAModule

__all__ = ["BlipTaskModule", "CaptioningModule", "RetrievalModule", "VQAModule"]
