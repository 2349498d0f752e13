"""Downstream tasks (LightningModules): retrieval, captioning, VQA, each written once against
``mflightning.models.interface.VisionLanguageBackbone``; the XVLM classes set XVLM's settings;
ImageClassificationModule: a vision transformer + dense head (vision-only transfer)."""
from mflightning.tasks.base import BlipTaskModule, TaskModule
from mflightning.tasks.captioning import CaptioningModule
from mflightning.tasks.classification import ImageClassificationModule
from mflightning.tasks.retrieval import RetrievalModule
from mflightning.tasks.vqa import VQAModule
from mflightning.tasks.xvlm_tasks import XVLMCaptioningModule, XVLMRetrievalModule, XVLMTaskModule, XVLMVQAModule
from mflightning.tasks.zero_shot import ZeroShotRetrievalModule

__all__ = [
    "BlipTaskModule",
    "CaptioningModule",
    "ImageClassificationModule",
    "RetrievalModule",
    "TaskModule",
    "VQAModule",
    "XVLMCaptioningModule",
    "XVLMRetrievalModule",
    "XVLMTaskModule",
    "XVLMVQAModule",
    "ZeroShotRetrievalModule",
]
