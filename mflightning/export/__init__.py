"""Compressed export: a pruned model in the compressed-tensors sparse layouts, and back.

    from mflightning.export import export_compressed, load_compressed

    report = export_compressed(model, result, "out/", format="auto", dtype="bf16")
    print(report.summary())
    model.load_state_dict(load_compressed("out/"))

`export_transformers(task_module_or_checkpoint, out_dir)` (`transformers_export`) writes a folder
transformers loads instead: a BLIP task module as its Blip* class, a CLIP/SigLIP/BLIP-2/LLaVA model
through `save_pretrained`, each with a model card and the mask file.

`sparse-bitmask` stores each masked layer's kept values plus one bit per weight (any sparsity);
`sparse-24-bitmask` stores two values of every four consecutive inputs plus the same bitmask
(2:4 layers only). Everything else in the model is written dense. Needs the compressed-tensors
package (`pip install 'mflightning[export]'`); importing this module does not import it.

Modules: `layouts` (one weight: 2:4 check, encode, decode), `sources` (module / state dict /
checkpoint and its masks), `writer` (`export_compressed`, `load_compressed`), `bench` (file
sizes at BLIP-base shapes; `python -m mflightning.export --bench`), `__main__` (the command line).
"""
from .layouts import AUTO, BITMASK, BITMASK_24, FORMATS, check_24, is_24
from .transformers_export import TransformersExport, export_transformers
from .writer import (CONFIG_NAME, WEIGHTS_NAME, ExportReport, LayerSize, check_zeros, export_compressed,
                     load_compressed, read_sparsity_config)

__all__ = [
    "AUTO", "BITMASK", "BITMASK_24", "CONFIG_NAME", "ExportReport", "FORMATS", "LayerSize", "WEIGHTS_NAME",
    "TransformersExport", "check_24", "check_zeros", "export_compressed", "export_transformers", "is_24", "load_compressed", "read_sparsity_config",
]
