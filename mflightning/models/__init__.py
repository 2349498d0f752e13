"""Backbones; importing a backbone module registers its pruning preset."""
from mflightning.models.blip import BlipBackbone, tiny_config

__all__ = ["BlipBackbone", "tiny_config"]
