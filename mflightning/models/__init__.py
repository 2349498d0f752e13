"""Backbones; importing a backbone module registers its pruning preset."""
from mflightning.models.blip import BlipBackbone, tiny_config
from mflightning.models.xvlm import XVLMBackbone, XVLMConfig
from mflightning.models.xvlm import tiny_config as xvlm_tiny_config

__all__ = ["BlipBackbone", "XVLMBackbone", "XVLMConfig", "tiny_config", "xvlm_tiny_config"]
