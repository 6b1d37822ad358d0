"""HAT-Net and TransCNN (one implementation, two families): what is theirs alone, on top of
the contract every family passes (``test_contract.py``): the grid attention's padding and
masks, the global level's pooling, and the official key names."""
import pytest
import torch

import reference as R
from mmhat.models.backbones.hatnet import HATAttention, HATNet
from mmhat.models.backbones.transcnn import TransCNN
from mmhat.models.layers import pad_amounts, window_attention

FAMILIES = [HATNet, TransCNN]


def test_arch_dict_builds_custom_variant():
    arch = dict(HATNet.arch_zoo['tiny'], depths=(1, 1, 1, 1))
    model = HATNet(arch=arch)
    assert [len(s.blocks) for s in model.stages] == [1, 1, 1, 1]


def test_transcnn_differs_from_hatnet_in_its_three_places():
    hat, trans = HATNet(arch='tiny'), TransCNN(arch='tiny')
    assert type(hat.stages[1].patch_embed).__name__ == 'ConvDownsample'
    assert type(trans.stages[1].patch_embed).__name__ == 'TwoBranchDownsample'
    assert type(hat.stem.norm1).__name__ == 'GroupNorm'
    assert type(trans.stem.norm1).__name__ == 'BatchNorm2d'
    ffn = trans.stages[0].blocks[0].ffn
    assert isinstance(ffn.pre_norm, torch.nn.Identity) and not isinstance(ffn.dw_norm,
                                                                          torch.nn.Identity)


# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize('hw', [(5, 6), (9, 17), (8, 8)])
def test_window_attention_does_not_depend_on_how_much_is_padded(hw):
    """Padding further, by whole extra cells of padding, changes no valid output."""
    torch.manual_seed(0)
    G, h = 4, 2
    qkv = torch.randn(2, 3 * h * 8, *hw)
    minimal = pad_amounts(hw, G)
    for fused in (True, False):
        ref = window_attention(qkv, G, h, 0.3, minimal, fused)
        more = window_attention(qkv, G, h, 0.3, (minimal[0] + G, minimal[1] + 2 * G), fused)
        assert ref.shape == (2, h * 8, *hw)
        torch.testing.assert_close(ref, more, rtol=1e-5, atol=1e-6)


def test_padded_keys_are_masked_not_attended():
    """A query's output equals attention over its cell's valid tokens only."""
    torch.manual_seed(0)
    qkv = torch.randn(1, 48, 5, 6)  # 2 heads of 8
    out = window_attention(qkv, 4, 2, 0.25, pad_amounts((5, 6), 4), fused=False)
    # Cell (1, 1) covers rows 4..7, cols 4..7; valid rows 4, cols 4..5.
    cell = qkv[:, :, 4:5, 4:6].reshape(1, 3, 2, 8, 2).permute(0, 1, 2, 4, 3)  # (1, 3, h, N, d)
    q, k, v = cell.unbind(1)
    expected = ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1) @ v  # (1, h, 2, d)
    got = out[:, :, 4, 4:6].reshape(1, 2, 8, 2).permute(0, 1, 3, 2)  # (1, h, 2, d)
    torch.testing.assert_close(got, expected)


def test_global_keys_pool_valid_pixels_only():
    """ceil-mode pooling: a border key is the mean of its valid pixels (no padded zeros)."""
    g = torch.randn(1, 4, 9, 10)
    pooled = torch.nn.functional.avg_pool2d(g, 4, 4, ceil_mode=True)
    assert pooled.shape[-2:] == (3, 3)
    torch.testing.assert_close(pooled[..., 2, 2], g[..., 8:, 8:].mean((-2, -1)))


@pytest.mark.parametrize('cls', FAMILIES)
def test_official_sizes_are_not_padded(cls, monkeypatch):
    """At the ImageNet size (a multiple of every grid), the attention never pads."""
    calls = []
    original = torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, 'pad',
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        cls(arch='tiny').eval()(torch.randn(1, 3, cls.pretrain_size, cls.pretrain_size))
    assert calls == []


def test_attention_alone_any_size():
    attn = HATAttention(32, 2, grid_size=7, ds_ratio=4, norm_cfg=dict(type='GN', num_groups=1))
    assert attn.eval()(torch.randn(2, 32, 13, 9)).shape == (2, 32, 13, 9)


# ----------------------------------------------------------------------------- checkpoints
def test_converter_names_the_official_keys():
    sd = R.official_state_dict('hatnet-tiny')
    conversion = HATNet.convert_checkpoint(sd)
    assert set(conversion.dropped) == {k for k in sd if k.startswith('classifier.')
                                       or '.attn.proj_norm.' in k}
    assert set(conversion.dropped.values()) == {'classification head',
                                                'never used by the official forward'}
    new = conversion.state_dict
    assert new['stages.2.blocks.5.ffn.pre_norm.weight'] is sd['blocks.2.5.conv.conv1.0.weight']
    assert new['stages.1.patch_embed.conv.weight'] is sd['ds2.conv.weight']
    assert new['stem.conv2.weight'] is sd['patch_embed.3.weight']
    trans = TransCNN.convert_checkpoint(R.official_state_dict('transcnn-tiny')).state_dict
    assert 'stages.3.blocks.1.ffn.dw_norm.running_var' in trans
    assert 'stages.2.patch_embed.residual.weight' in trans
