"""mflightning: task-agnostic, gradient-free pruning of vision-language models (MULTIFLOW) for Lightning."""
__version__ = "0.1.0"

from .pruning import PruningConfig, PruningResult, prune  # noqa: E402
from .pruning.presets import add_preset_loader  # noqa: E402


def _load_builtin_presets() -> None:
    """Import the built-in backbones (heavy: transformers, timm) so their presets register, on first use."""
    from .models import blip, xvlm  # noqa: F401


add_preset_loader(_load_builtin_presets)

__all__ = ["MultiFlowCallback", "PruningConfig", "PruningResult", "prune", "__version__"]


def __getattr__(name: str):
    # The callback imports Lightning; keep `import mflightning` light for pure-torch users.
    if name == "MultiFlowCallback":
        from .callback import MultiFlowCallback

        return MultiFlowCallback
    raise AttributeError(f"module 'mflightning' has no attribute {name!r}")
