"""Downstream tasks (LightningModules): retrieval, captioning, VQA on BLIP and XVLM-style backbones."""
from mflightning.tasks.base import BlipTaskModule
from mflightning.tasks.captioning import CaptioningModule
from mflightning.tasks.retrieval import RetrievalModule
from mflightning.tasks.vqa import VQAModule
from mflightning.tasks.xvlm_tasks import XVLMCaptioningModule, XVLMRetrievalModule, XVLMTaskModule, XVLMVQAModule

__all__ = [
    "BlipTaskModule",
    "CaptioningModule",
    "RetrievalModule",
    "VQAModule",
    "XVLMCaptioningModule",
    "XVLMRetrievalModule",
    "XVLMTaskModule",
    "XVLMVQAModule",
]
