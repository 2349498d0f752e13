"""The pruning engine: pure torch, no Lightning."""
from .allocation import ALLOCATIONS, compute_masks, parse_pattern, pattern_violations
from .config import PruningConfig, check_method, check_sparsity
from .engine import prune
from .methods import METHODS, Method, get_method, register_method
from .presets import Preset, available_presets, get_preset, register_preset
from .result import PruningResult, apply_masks
from .stats import CalibrationError, collect_gradients, collect_input_norms, default_forward, default_token_mask
from .targets import find_targets, resolve_modalities
from .upkeep import MaskKeeper

__all__ = [
    "ALLOCATIONS",
    "CalibrationError",
    "METHODS",
    "MaskKeeper",
    "Method",
    "PruningConfig",
    "Preset",
    "PruningResult",
    "apply_masks",
    "available_presets",
    "check_method",
    "check_sparsity",
    "collect_gradients",
    "collect_input_norms",
    "compute_masks",
    "default_forward",
    "default_token_mask",
    "find_targets",
    "get_method",
    "parse_pattern",
    "pattern_violations",
    "get_preset",
    "prune",
    "register_method",
    "register_preset",
    "resolve_modalities",
]
