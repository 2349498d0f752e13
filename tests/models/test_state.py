"""`resize_position_embeddings`: the original loaders' CLS-kept bicubic grid resize."""
import pytest
import torch
import torch.nn.functional as F

from mflightning.models.state import resize_position_embeddings


def test_resize_keeps_cls_and_matches_a_direct_bicubic_resize():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 16, 6)
    out = resize_position_embeddings(pos, 36)
    assert out.shape == (1, 37, 6)
    assert torch.equal(out[:, 0], pos[:, 0])
    # rows first: entry r*4+c of the patch table is grid cell (r, c)
    grid = pos[0, 1:].reshape(4, 4, 6).permute(2, 0, 1).unsqueeze(0)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    assert torch.allclose(out[0, 1:], expected[0].permute(1, 2, 0).reshape(36, 6), atol=1e-6)
    # a 2-D table (XVLM's nn.Embedding) keeps its layout; the same size is returned unchanged
    assert torch.allclose(resize_position_embeddings(pos[0], 36), out[0])
    assert resize_position_embeddings(pos, 16) is pos


def test_resize_rejects_non_square_grids_naming_the_tensor():
    with pytest.raises(ValueError, match="visual_encoder.pos_embed.*square"):
        resize_position_embeddings(torch.zeros(1, 1 + 15, 4), 16, where="visual_encoder.pos_embed")
    with pytest.raises(ValueError, match="target of 20"):
        resize_position_embeddings(torch.zeros(1, 17, 4), 20)
