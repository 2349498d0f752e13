"""mflightning: task-agnostic, gradient-free pruning of vision-language models (MULTIFLOW) for Lightning."""
__version__ = "0.1.0"

from .pruning import PruningConfig, PruningResult, prune  # noqa: E402
from .pruning.presets import add_preset_loader, register_recogniser  # noqa: E402


def _load_builtin_presets() -> None:
    """Import the built-in backbones (heavy: transformers, timm) so their presets register, on first use;
    also transformers' families (clip, siglip, blip2, llava: `models/hf_families.py`) and the vision
    transformers of transformers, timm and torchvision (vit, timm_vit, torchvision_vit: `models/vit_families.py`)."""
    from .models import blip, hf_families, vit_families, xvlm  # noqa: F401


def _recognise_transformers_family(model) -> "str | None":
    """The preset of a transformers CLIP / SigLIP / BLIP-2 / LLaVA model in `model` (bare or wrapped).

    Only a model holding some transformers module imports the family module (and the built-in
    backbones, through the loader): a plain torch model stays cheap.
    """
    if not any(type(m).__module__.startswith("transformers.") for m in model.modules()):
        return None
    _load_builtin_presets()
    from .models.hf_families import recognise

    return recognise(model)


def _recognise_vision_family(model) -> "str | None":
    """The preset of a vision-only ViT (transformers ViT/DeiT/Dinov2, timm, torchvision) that `model` is or holds."""
    if not any(type(m).__module__.startswith(("transformers.", "timm.", "torchvision.")) for m in model.modules()):
        return None
    from .models.vit_families import recognise

    return recognise(model)


add_preset_loader(_load_builtin_presets)
register_recogniser(_recognise_transformers_family)
register_recogniser(_recognise_vision_family)

__all__ = ["MultiFlowCallback", "PruningConfig", "PruningResult", "prune", "__version__"]


def __getattr__(name: str):
    # The callback imports Lightning; keep `import mflightning` light for pure-torch users.
    if name == "MultiFlowCallback":
        from .callback import MultiFlowCallback

        return MultiFlowCallback
    raise AttributeError(f"module 'mflightning' has no attribute {name!r}")
