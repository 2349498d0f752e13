"""Backbones; importing a backbone module registers its pruning preset.

``VisionLanguageBackbone`` (``interface.py``) is what the task modules use from a backbone;
``BlipBackbone`` and ``XVLMBackbone`` implement it.
"""
from mflightning.models.blip import BlipBackbone, tiny_config
from mflightning.models.interface import VisionLanguageBackbone, with_first_token
from mflightning.models.xvlm import XVLMBackbone, XVLMConfig
from mflightning.models.xvlm import tiny_config as xvlm_tiny_config

__all__ = ["BlipBackbone", "VisionLanguageBackbone", "XVLMBackbone", "XVLMConfig", "tiny_config", "with_first_token",
           "xvlm_tiny_config"]
