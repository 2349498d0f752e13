"""Compressed export: round trips through compressed-tensors' decompression, layouts, sizes, sources and errors."""
import json
import importlib.util

import pytest
import torch
from torch import nn

pytest.importorskip("compressed_tensors")

from compressed_tensors.config import SparsityCompressionConfig  # noqa: E402
from compressed_tensors.utils import get_nested_weight_mappings, unpack_bitmasks  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mflightning import PruningResult, prune  # noqa: E402
from mflightning.export import export_compressed, load_compressed  # noqa: E402

LEGACY = importlib.util.find_spec("compressed_tensors.compressors.sparse_compressors") is not None
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.LayerNorm(48), nn.Linear(48, 16), nn.Linear(16, 8))


def pruned_mlp(sparsity=0.75, seed=0):
    model = mlp(seed)
    result = prune(model, sparsity=sparsity, method="omp", allocation="layer", exclude=[r"^4\."])  # 4: a dense head
    result.apply(model)
    return model, result


def two_four(model, names):
    """Keep the 2 largest |w| of every 4 consecutive inputs in each row; zero the rest in place."""
    params = dict(model.named_parameters())
    masks = {}
    for name in names:
        weight = params[name].detach()
        groups = weight.abs().reshape(-1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
        masks[name] = keep.reshape(weight.shape)
        with torch.no_grad():
            params[name].mul_(masks[name])
    return masks


def ct_decompress(directory):
    """The export decoded with compressed-tensors' own config classes and helpers only (not mflightning's loader)."""
    sparsity = json.loads((directory / "config.json").read_text())["quantization_config"]["sparsity_config"]
    config = SparsityCompressionConfig.load_from_registry(sparsity["format"], **sparsity)
    parts = ("shape", "compressed", "bitmask") + (("row_offsets",) if config.format == "sparse-bitmask" else ())
    nested, others = get_nested_weight_mappings(str(directory), parts, return_unmatched_params=True)
    tensors = load_file(str(directory / "model.safetensors"))
    out = {name: tensors[name] for name in others}
    for module in nested:
        shape = tensors[f"{module}.shape"].flatten().tolist()
        stored = unpack_bitmasks(tensors[f"{module}.bitmask"], shape)
        dense = torch.zeros(shape, dtype=tensors[f"{module}.compressed"].dtype)
        dense[stored] = tensors[f"{module}.compressed"].flatten()
        out[f"{module}.weight"] = dense
    return out, config, tensors


def assert_exact(decoded, expected, mask=None):
    """Same values; bit for bit where kept (a pruned -0.0 comes back as +0.0: zeros are not stored)."""
    assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
    assert torch.equal(decoded, expected)
    keep = torch.ones_like(expected, dtype=torch.bool) if mask is None else mask
    bits = BITS.get(expected.dtype)
    if bits is not None:
        assert torch.equal(decoded.view(bits)[keep], expected.view(bits)[keep])
    if mask is not None:
        assert (decoded[~mask] == 0).all()


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitmask_round_trip_through_compressed_tensors_is_exact(tmp_path, dtype):
    model, result = pruned_mlp(0.75)
    report = export_compressed(model, result, tmp_path, dtype=dtype if dtype == torch.bfloat16 else None)
    assert report.format == "sparse-bitmask" and report.sparsity_structure == "unstructured"
    expected = {n: t.to(dtype) for n, t in model.state_dict().items()}
    decoded, config, tensors = ct_decompress(tmp_path)
    assert set(decoded) == set(expected)
    masks = result.masks_for(model)
    for name, tensor in expected.items():
        assert_exact(decoded[name], tensor, masks.get(name))
    # compressed are exactly the masked layers; the dense head, norm and biases are stored as they are
    assert sorted(config.targets) == ["0", "3"] and config.sparsity_structure == "unstructured"
    assert "4.weight" in tensors and "0.weight" not in tensors and "0.compressed" in tensors
    assert tensors["0.compressed"].dtype == dtype and tensors["0.compressed"].numel() == int(masks["0.weight"].sum())
    stored = unpack_bitmasks(tensors["0.bitmask"], [48, 24])
    counts = stored.sum(1)
    assert torch.equal(tensors["0.row_offsets"], torch.cumsum(counts, 0) - counts)
    assert torch.equal(stored, masks["0.weight"])
    # mflightning's loader agrees with compressed-tensors' decoding
    loaded = load_compressed(tmp_path)
    assert set(loaded) == set(decoded) and all(torch.equal(loaded[n], decoded[n]) for n in decoded)
    fresh = mlp(seed=1).to(dtype)
    fresh.load_state_dict(loaded)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), expected.values()))


@pytest.mark.parametrize("format", ["sparse-24-bitmask", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_four_round_trip_and_layout(tmp_path, format, dtype):
    model = mlp().to(dtype)
    masks = two_four(model, ["0.weight", "3.weight"])
    report = export_compressed(model, masks, tmp_path, format=format)
    assert report.format == "sparse-24-bitmask" and report.sparsity_structure == "2:4"
    decoded, config, tensors = ct_decompress(tmp_path)
    assert config.format == "sparse-24-bitmask" and config.sparsity_structure == "2:4"
    assert tensors["0.compressed"].shape == (48, 12) and tensors["0.bitmask"].shape == (48, 3)
    assert tensors["0.shape"].tolist() == [[48], [24]] and "0.row_offsets" not in tensors
    for name, tensor in model.state_dict().items():
        assert_exact(decoded[name], tensor, masks.get(name))
    # values (2 of 4) + 1 bit per weight
    layer = report.layers["0.weight"]
    assert layer.compressed_bytes == 48 * 12 * torch.empty((), dtype=dtype).element_size() + 48 * 3 + 2 * 8


def test_two_four_groups_keeping_fewer_than_two_are_padded_with_zeros(tmp_path):
    model = nn.Sequential(nn.Linear(8, 2, bias=False))
    weight = torch.tensor([[1.0, 0, 0, 0, -2.0, 3.0, 0, 0], [0, 0, 0, 0, 0, 4.0, 0, -5.0]])
    mask = weight != 0
    model[0].weight.data.copy_(weight)
    export_compressed(model, {"0.weight": mask}, tmp_path, format="sparse-24-bitmask")
    decoded, _, tensors = ct_decompress(tmp_path)
    assert tensors["0.compressed"].shape == (2, 4)  # always 2 stored per group, zeros where fewer kept
    assert_exact(decoded["0.weight"], weight, mask)
    assert torch.equal(load_compressed(tmp_path)["0.weight"], weight)


@pytest.mark.skipif(not LEGACY, reason="compressed-tensors >= 0.15 dropped its sparse compressors "
                    "(sparse_compressors); run with compressed-tensors <= 0.14 to cross-check against them")
@pytest.mark.parametrize("format", ["sparse-bitmask", "sparse-24-bitmask"])
def test_files_match_compressed_tensors_sparse_compressors(tmp_path, format):
    from compressed_tensors.compressors import ModelCompressor

    model = mlp()
    if format == "sparse-bitmask":
        result = prune(model, sparsity=0.6, method="omp", exclude=[r"^4\."])
        masks = result.apply(model)
    else:
        masks = two_four(model, ["0.weight", "3.weight"])
    export_compressed(model, masks, tmp_path, format=format, dtype="bf16")
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    compressor = ModelCompressor.from_compression_config(config)
    dense = dict(compressor.sparsity_compressor.decompress(str(tmp_path)))
    for name, tensor in model.state_dict().items():
        assert_exact(dense[name], tensor.to(torch.bfloat16), masks.get(name))
    # their compressor writes the very tensors this export wrote
    model = model.to(torch.bfloat16)
    theirs = compressor.compress(model, model.state_dict())
    ours = load_file(str(tmp_path / "model.safetensors"))
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k].to(ours[k].dtype), ours[k]) for k in ours)
    # and their model decompression loads the folder into a fresh model
    fresh = mlp(seed=3).to(torch.bfloat16)
    compressor.decompress(str(tmp_path), fresh)
    restored = fresh.state_dict()  # (their loader re-registers weights: compare by name, not by order)
    assert all(torch.equal(restored[n], t) for n, t in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- models and sources
def test_tiny_blip_backbone_ties_stored_once_and_restored(tmp_path):
    from mflightning.models.blip import BlipBackbone, tiny_config

    torch.manual_seed(0)
    model = BlipBackbone(tiny_config(40), tie_decoder=True)
    result = prune(model, sparsity=0.63, method="omp")
    result.apply(model)
    report = export_compressed(model, result, tmp_path, dtype="bf16")
    assert set(report.targets) == {n[: -len(".weight")] for n in result.masks}
    assert not any(t.split(".")[0] in ("vision_proj", "text_proj", "itm_head") for t in report.targets)
    assert "text_decoder.cls.predictions.decoder.weight" in report.aliases  # tied to the word embeddings
    file = load_file(str(tmp_path / "model.safetensors"))
    assert not set(report.aliases) & set(file)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 40  # the backbone's own config is kept beside
    loaded = load_compressed(tmp_path)
    expected = {n: t.to(torch.bfloat16) for n, t in model.state_dict().items()}
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    decoded, _, _ = ct_decompress(tmp_path)  # without the aliases, compressed-tensors sees each tensor once
    assert set(decoded) == set(expected) - set(report.aliases)
    # a save_pretrained folder exports the same layers, carrying its config.json over
    model.save_pretrained(tmp_path / "pretrained")
    from_folder = export_compressed(tmp_path / "pretrained", result, tmp_path / "from_folder", dtype="bf16")
    assert from_folder.layers == report.layers
    assert json.loads((tmp_path / "from_folder" / "config.json").read_text())["text_config"]["vocab_size"] == 40
    with pytest.raises(ValueError, match="source folder"):
        export_compressed(tmp_path / "pretrained", result, tmp_path / "pretrained")


def test_lightning_checkpoint_with_callback_masks_or_a_mask_file(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from mflightning import MultiFlowCallback

    class Task(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = mlp()

        def training_step(self, batch, _):
            return nn.functional.mse_loss(self.model(batch[0]), batch[1])

        def configure_optimizers(self):  # weight decay: only the callback keeps pruned weights at zero
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    task = Task()
    result = prune(task.model, sparsity=0.9, method="omp", allocation="layer", exclude=[r"^4\."])
    data = DataLoader(TensorDataset(torch.randn(8, 24), torch.randn(8, 8)), batch_size=4)
    trainer = L.Trainer(max_steps=2, callbacks=[MultiFlowCallback(masks=result)], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    trainer.fit(task, data)
    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    report = export_compressed(checkpoint, None, tmp_path / "a")  # masks from the callback's state
    assert sorted(report.targets) == ["model.0", "model.3"]
    # a mask file of the bare model, matched under the task module's `model.` prefix
    result.save(tmp_path / "masks.safetensors")
    report_b = export_compressed(str(checkpoint), tmp_path / "masks.safetensors", tmp_path / "b", dtype="bf16")
    assert report_b.targets == report.targets and report_b.dtype == "bfloat16"
    for directory, dtype in (("a", torch.float32), ("b", torch.bfloat16)):
        loaded = load_compressed(tmp_path / directory)
        assert all(torch.equal(loaded[n], t.to(dtype)) for n, t in task.state_dict().items())
    with pytest.raises(ValueError, match="no masks"):
        export_compressed(task, None, tmp_path / "c")


def test_masked_tensors_compressed_tensors_cannot_name_stay_dense(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 16))
    result = prune(model, sparsity=0.5, method="omp")
    result.apply(model)
    report = export_compressed(model, result, tmp_path)
    assert "0.in_proj_weight" in report.dense_masked and "0.out_proj" in report.targets
    loaded = load_compressed(tmp_path)
    assert all(torch.equal(loaded[n], t) for n, t in model.state_dict().items())
    assert (loaded["0.in_proj_weight"][~result.masks["0.in_proj_weight"]] == 0).all()


def test_existing_config_json_is_updated_not_replaced(tmp_path):
    model, result = pruned_mlp()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 48}))
    export_compressed(model, result, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bert" and config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["mflightning_export"]["masks"]["method"] == "omp"


def test_sizes_at_75_percent_meet_the_bitmask_floor(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 768), nn.Linear(768, 3072), nn.Linear(3072, 768)).to(torch.bfloat16)
    result = prune(model, sparsity=0.75, method="omp", allocation="layer")
    result.apply(model)
    report = export_compressed(model, result, tmp_path)
    # bf16 values of a quarter of the weights (0.25) + 1 bit per weight (1/16) = 0.3125, + row offsets
    assert 0.3125 <= report.layer_ratio <= 0.32
    dense_file = sum(t.numel() * 2 for t in model.state_dict().values())
    assert report.dense_tensor_bytes == dense_file


# ---------------------------------------------------------------------------------------------- errors
def test_weights_not_zero_where_masked_is_an_error_naming_the_layer(tmp_path):
    model = mlp()
    result = prune(model, sparsity=0.5, method="omp", exclude=[r"^4\."])  # masks computed, never applied
    with pytest.raises(ValueError, match=r"layer '0\.weight' has \d+ non-zero weight\(s\) where its mask prunes"):
        export_compressed(model, result, tmp_path)
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "config.json").exists()
    result.apply(model)
    with torch.no_grad():
        model[3].weight[~result.masks["3.weight"]] = float("nan")
    with pytest.raises(ValueError, match=r"'3\.weight'.*nan"):
        export_compressed(model, result, tmp_path)


def test_two_four_violation_names_the_first_layer_row_and_columns(tmp_path):
    model = mlp()
    masks = two_four(model, ["0.weight"])
    mask = torch.zeros(16, 48, dtype=torch.bool)
    mask[:, ::2] = True  # 2 of every 4 ...
    mask[5, 9] = True  # ... but row 5 keeps 3 in columns 8-11
    masks["3.weight"] = mask
    with torch.no_grad():
        model[3].weight.mul_(mask)
    with pytest.raises(ValueError, match=r"layer '3\.weight' is not 2:4 sparse: row 5 keeps 3 of the 4 weights in "
                                         r"columns 8-11"):
        export_compressed(model, masks, tmp_path, format="sparse-24-bitmask")
    assert not (tmp_path / "model.safetensors").exists()
    assert export_compressed(model, masks, tmp_path, format="auto").format == "sparse-bitmask"
    odd = nn.Sequential(nn.Linear(6, 4))
    odd_mask = torch.ones(4, 6, dtype=torch.bool).tril()
    with torch.no_grad():
        odd[0].weight.mul_(odd_mask)
    with pytest.raises(ValueError, match=r"'0\.weight' \(shape \(4, 6\)\).*multiple of 4"):
        export_compressed(odd, {"0.weight": odd_mask}, tmp_path / "odd", format="sparse-24-bitmask")


def test_bad_arguments_are_errors_naming_them(tmp_path):
    model, result = pruned_mlp()
    with pytest.raises(ValueError, match="unknown compressed format 'sparse-csr'"):
        export_compressed(model, result, tmp_path, format="sparse-csr")
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        export_compressed(model, result, tmp_path, dtype="int4")
    with pytest.raises(ValueError, match=r"mask of '0\.weight' has shape \(24, 48\)"):
        export_compressed(model, {"0.weight": torch.ones(24, 48, dtype=torch.bool)}, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        export_compressed(tmp_path / "missing.ckpt", None, tmp_path)
    export_compressed(model, result, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["sparsity_config"]["format"] = "sparse-csr"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sparse-csr"):
        load_compressed(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_compressed(tmp_path / "nowhere")


def test_pruning_result_and_plain_dict_masks_agree(tmp_path):
    model, result = pruned_mlp(0.63)
    a = export_compressed(model, result, tmp_path / "a")
    b = export_compressed(model.state_dict(), {n: m.tolist() for n, m in result.masks.items()}, tmp_path / "b")
    assert a.layers == b.layers and a.global_sparsity == b.global_sparsity
    assert isinstance(result, PruningResult)


def test_the_mflightning_command_exports_and_names_bad_input(tmp_path, capsys):
    import subprocess
    import sys

    from mflightning.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["export", str(tmp_path / "missing.ckpt"), "--output_dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert "missing.ckpt" in capsys.readouterr().err
    done = subprocess.run([sys.executable, "-m", "mflightning.cli", "export", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "sparse-24-bitmask" in done.stdout


def test_the_command_names_its_masks_option_and_files_get_the_umask_permissions(tmp_path, capsys):
    """Without masks the error names --masks (the option typed), not the Python argument; files are 0o666 - umask."""
    import os

    from mflightning.cli import main

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    state = tmp_path / "state.pt"
    torch.save(model.state_dict(), state)
    with pytest.raises(SystemExit) as stop:
        main(["export", str(state), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "pass --masks MASK_FILE" in err and "masks=" not in err
    previous = os.umask(0o022)
    try:
        result = prune(model, sparsity=0.5, method="omp")
        result.apply(model)
        masks = result.save(tmp_path / "masks.safetensors")
        torch.save(model.state_dict(), state)
        main(["export", str(state), "--masks", str(masks), "--output_dir", str(tmp_path / "out")])
        os.umask(0o002)
        again = result.save(tmp_path / "group.safetensors")
    finally:
        os.umask(previous)
    assert oct(os.stat(masks).st_mode & 0o777) == "0o644"
    assert oct(os.stat(tmp_path / "out" / "model.safetensors").st_mode & 0o777) == "0o644"
    assert oct(os.stat(again).st_mode & 0o777) == "0o664"
