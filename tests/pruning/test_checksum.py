"""Mask and score files carry a checksum of their tensors: bytes changed inside tensor data are caught on load."""
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mflightning import PruningResult, prune
from toy_models import GROUPS, ToyVLM, make_batches, model_inputs


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    return prune(ToyVLM(), sparsity=0.5, calibration=[model_inputs(b) for b in make_batches(2)], modalities=GROUPS, exclude=[r"^head\."])


def data_span(path, key):
    """Where tensor `key`'s bytes lie in a safetensors file (absolute offsets)."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8 : 8 + size])[key]["data_offsets"]
    return 8 + size + start, 8 + size + end


def overwrite(path, key, count):
    start, end = data_span(path, key)
    raw = bytearray(path.read_bytes())
    for i in range(start, min(end, start + count)):
        raw[i] = 1 - raw[i] if key.startswith("mask/") else raw[i] ^ 0x40  # a flipped mask entry; a changed float
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("key", ["mask/text.fc1.weight", "score/vision.0.weight"])
def test_bytes_overwritten_inside_tensor_data_are_caught(result, tmp_path, key):
    path = result.save(tmp_path / "masks.safetensors", include_scores=True)
    assert PruningResult.load(path).masks.keys() == result.masks.keys()  # intact: loads
    overwrite(path, key, 42)
    with pytest.raises(ValueError, match=r"masks\.safetensors' is corrupted: its tensors do not match the checksum"):
        PruningResult.load(path)


def test_a_file_written_before_checksums_loads_with_a_note(result, tmp_path):
    path = result.save(tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "checksum"}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=metadata)
    with pytest.warns(UserWarning, match=r"old\.safetensors' has no checksum.*loaded unverified"):
        loaded = PruningResult.load(old)
    assert all(torch.equal(loaded.masks[n], m) for n, m in result.masks.items())
