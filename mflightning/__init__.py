"""mflightning: task-agnostic, gradient-free pruning of vision-language models (MULTIFLOW) for Lightning."""
__version__ = "0.1.0"

from .pruning import PruningResult, prune  # noqa: E402

__all__ = ["MultiFlowCallback", "PruningResult", "prune", "__version__"]


def __getattr__(name: str):
    # The callback imports Lightning; keep `import mflightning` light for pure-torch users.
    if name == "MultiFlowCallback":
        from .callback import MultiFlowCallback

        return MultiFlowCallback
    raise AttributeError(f"module 'mflightning' has no attribute {name!r}")
