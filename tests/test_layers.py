"""The shared attention kernel and layout helpers."""
import pytest
import torch

from mmhat.models.layers import (attention, crop, nchw_to_nlc, nlc_to_nchw, pad_amounts,
                                 pad_bottom_right, set_fused_attn, use_fused_attn,
                                 window_partition, window_reverse)


@pytest.mark.parametrize('with_mask', [False, True])
def test_fused_and_explicit_attention_agree(with_mask):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 7, 8), torch.randn(2, 3, 5, 11, 8), torch.randn(2, 3, 5, 11, 6)
    mask = torch.rand(1, 1, 5, 1, 11) > 0.3 if with_mask else None
    if mask is not None:
        mask[..., 0] = True
    scale = 0.37  # not d ** -0.5: both paths must use the scale given
    a = attention(q, k, v, scale, mask, fused=True)
    b = attention(q, k, v, scale, mask, fused=False)
    assert a.shape == (2, 3, 5, 7, 6)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    logits = torch.einsum('...qd,...kd->...qk', q, k) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float('-inf'))
    torch.testing.assert_close(b, logits.softmax(-1) @ v, rtol=1e-5, atol=1e-6)


def test_masked_keys_get_no_weight():
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    mask = torch.tensor([[True, True, True, False, False, False]])  # (N_q=1 broadcast, N_k)
    changed = v.clone()
    changed[..., 3:, :] = 1e6
    for fused in (True, False):
        torch.testing.assert_close(attention(q, k, v, 1.0, mask, fused),
                                   attention(q, k, changed, 1.0, mask, fused))


def test_fused_path_never_falls_back_to_the_math_kernel():
    """Head-split views of NCHW maps have stride N along d; SDPA would then run its math
    backend (the full N_q x N_k matrix). The kernel must hand it unit-stride operands."""
    from torch.profiler import profile
    torch.manual_seed(0)
    maps = torch.randn(1, 2 * 16, 24, 20)  # (B, h*d, H, W) as HAT-Net's 1x1 convs give
    q = maps.view(1, 2, 16, 480).transpose(-2, -1)  # (B, h, N, d), stride(-1) == N
    kv = maps[..., ::4, ::4].reshape(1, 2, 16, 30).transpose(-2, -1)
    assert q.stride(-1) != 1
    with profile() as prof:
        out = attention(q, kv, kv, 0.25, fused=True)
    kernels = {e.key for e in prof.key_averages()}
    assert 'aten::_scaled_dot_product_attention_math' not in kernels, kernels
    torch.testing.assert_close(out, attention(q, kv, kv, 0.25, fused=False), rtol=1e-5,
                               atol=1e-6)


def test_global_default_and_module_override():
    try:
        set_fused_attn(False)
        assert use_fused_attn() is False and use_fused_attn(True) is True
        set_fused_attn(True)
        assert use_fused_attn() is True and use_fused_attn(False) is False
    finally:
        set_fused_attn(True)


def test_layout_round_trips():
    x = torch.randn(2, 5, 12, 8)
    tokens = nchw_to_nlc(x)
    assert tokens.shape == (2, 96, 5)
    assert torch.equal(tokens[0, 8 * 3 + 2], x[0, :, 3, 2])  # row-major token order
    assert torch.equal(nlc_to_nchw(tokens, (12, 8)), x)
    cells = window_partition(x, 4)
    assert cells.shape == (2, 3, 2, 16, 5)
    assert torch.equal(cells[1, 2, 1, 4 * 1 + 3], x[1, :, 8 + 1, 4 + 3])  # cell (2,1), (gy,gx)=(1,3)
    assert torch.equal(window_reverse(cells, 4), x)
    with pytest.raises(ValueError, match='cannot form a 5x5 map'):
        nlc_to_nchw(tokens, (5, 5))


def test_pad_and_crop():
    assert pad_amounts((33, 47), 8) == (7, 1)
    assert pad_amounts((32, 48), 8) == (0, 0)
    x = torch.randn(1, 2, 5, 6)
    assert pad_bottom_right(x, 0, 0) is x
    padded = pad_bottom_right(x, 3, 2)
    assert padded.shape == (1, 2, 8, 8) and padded[..., 5:, :].abs().sum() == 0
    assert torch.equal(crop(padded, (5, 6)), x)
    assert crop(x, (5, 6)) is x
