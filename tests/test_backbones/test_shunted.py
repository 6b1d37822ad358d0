"""Shunted Transformer: what is its own, on top of the contract every family passes
(``test_contract.py``): the rates of the key/value branches, the padding rule of its strided
convs, the conv stem and the official key names."""

import pytest
import torch

import reference as R
from mmhat.models.backbones.shunted import (ConvPatchEmbed, KeyValueBranch, ShuntedAttention,
                                            ShuntedTransformer)
from mmhat.registry import MODELS


def build(arch='tiny', **kwargs) -> ShuntedTransformer:
    return MODELS.build(dict(type='mmhat.ShuntedTransformer', arch=arch, **kwargs))


def stage_sizes(H: int, W: int):
    return [(ShuntedTransformer.stage_size(H, i), ShuntedTransformer.stage_size(W, i))
            for i in range(4)]


# ----------------------------------------------------------------------------- variants
def test_branch_rates_come_from_the_table():
    """Each shunted layer aggregates at (sr, sr/2), whatever sr the table gives."""
    arch = dict(ShuntedTransformer.arch_zoo['tiny'], sr_ratios=(4, 16, 2, 1),
                depths=(1, 1, 1, 1))
    model = build(arch).eval()
    kernels = [[b.reduce.kernel_size[0] for b in stage.blocks[0].attn.branches]
               for stage in model.stages]
    assert kernels == [[4, 2], [16, 8], [2, 1], []]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 40, 56))
    assert [tuple(o.shape[-2:]) for o in outs] == stage_sizes(40, 56)


@pytest.mark.parametrize('sr_ratio,num_heads', [(3, 2), (4, 3)])
def test_shunted_attention_needs_even_rate_and_heads(sr_ratio, num_heads):
    with pytest.raises(ValueError, match='even sr_ratio'):
        ShuntedAttention(48, num_heads, sr_ratio, dict(type='GELU'))


# ----------------------------------------------------------------------------- any size
@pytest.mark.parametrize('hw', [(64, 96), (224, 224)])
def test_multiples_of_32_are_never_padded(hw, monkeypatch):
    """Where the official code drops nothing, nothing is padded: the outputs are the
    official computation (proven against the reference at 224x224)."""
    calls = []
    original = torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, 'pad',
                        lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    with torch.no_grad():
        build().eval()(torch.randn(1, 3, *hw))
    assert calls == []


def test_other_sizes_pad_by_less_than_a_window(monkeypatch):
    calls = []
    original = torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, 'pad',
                        lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    arch = dict(ShuntedTransformer.arch_zoo['tiny'], depths=(1, 1, 1, 1))
    with torch.no_grad():
        build(arch).eval()(torch.randn(1, 3, 33, 47))
    # F.pad's (left, right, top, bottom): the stem's 17x24 map -> +1 row; stage 1 (9x12):
    # rate 8 -> +7 rows, +4 cols, rate 4 -> +3, +0; stage 2 (5x6): rate 4 -> +3, +2,
    # rate 2 -> +1, +0; stage 3 (3x3): rate 2 -> +1, +1; stage 4: full attention.
    assert calls == [(0, 0, 0, 1), (0, 4, 0, 7), (0, 0, 0, 3), (0, 2, 0, 3), (0, 0, 0, 1),
                     (0, 1, 0, 1)]


def test_trailing_tokens_take_part_as_keys():
    """The official reducing conv floors: on a 9x13 map with rate 4 it makes 2x3 keys from
    rows 0..7 and columns 0..11. Here there are 3x4 keys; the full windows' keys do not
    depend on the trailing row/column, the border keys do, and aggregate the valid tokens
    with zeros (the same as explicitly zero-padding the map)."""
    torch.manual_seed(0)
    branch = KeyValueBranch(16, 8, rate=4, act_cfg=dict(type='GELU')).eval()
    x = torch.randn(1, 16, 9, 13)
    changed = x.clone()
    changed[:, :, 8, :] += 1
    changed[:, :, :, 12] += 1
    with torch.no_grad():
        k, v = branch(x, num_heads=2)
        k2, _ = branch(changed, num_heads=2)
        k_pad, v_pad = branch(torch.nn.functional.pad(x, (0, 3, 0, 3)), num_heads=2)
    assert k.shape == v.shape == (1, 2, 3 * 4, 4)
    grid = (k2 - k).abs().amax(dim=(0, 1, 3)).view(3, 4)  # per key position
    assert (grid[:2, :3] == 0).all() and (grid[2, :] > 0).all() and (grid[:, 3] > 0).all()
    torch.testing.assert_close(k, k_pad, rtol=0, atol=0)
    torch.testing.assert_close(v, v_pad, rtol=0, atol=0)


def test_stem_covers_odd_maps():
    """The official 2x2 patch merge floors (a 17-row map gives 8 rows, dropping row 16);
    here it gives ceil(17 / 2) = 9 rows and the last row of the map reaches the output."""
    embed = ConvPatchEmbed(8, 8, kernel_size=2, stride=2).eval()
    x = torch.randn(1, 8, 17, 24)
    with torch.no_grad():
        tokens, hw = embed(x)
        x[:, :, 16] += 1
        changed, _ = embed(x)
    assert hw == (9, 12) and tokens.shape == (1, 9 * 12, 8)
    moved = (changed - tokens).abs().amax(dim=(0, 2)).view(9, 12)
    assert (moved[:8] == 0).all() and (moved[8] > 0).all()


def test_frozen_stages_zero_freezes_the_conv_stem_only():
    model = build(frozen_stages=0).train()
    assert not model.stem.training and all(not p.requires_grad for p in model.stem.parameters())
    assert all(p.requires_grad for p in model.stages.parameters())


# ----------------------------------------------------------------------------- checkpoints
def test_converter_names_the_official_keys():
    sd = R.official_state_dict('shunted-tiny')
    conversion = ShuntedTransformer.convert_checkpoint(sd)
    assert set(conversion.dropped) == {'head.weight', 'head.bias'}
    renamed = conversion.state_dict
    assert renamed['stages.0.patch_embed.proj.weight'] is sd['patch_embed1.conv.3.weight']
    assert renamed['stem.0.bn.running_var'] is sd['patch_embed1.conv.1.running_var']
    assert renamed['stages.2.blocks.3.attn.branches.1.reduce.weight'] is sd[
        'block3.3.attn.sr2.weight']
    assert renamed['stages.3.blocks.0.attn.local_conv.bias'] is sd['block4.0.attn.local_conv.bias']
    assert renamed['stages.1.blocks.0.ffn.dwconv.weight'] is sd['block2.0.mlp.dwconv.dwconv.weight']
    assert renamed['stages.1.blocks.1.ffn.fc2.bias'] is sd['block2.1.mlp.fc2.bias']


def test_stem_of_every_variant_takes_the_official_conv_indices():
    """The official stem is one Sequential whose length varies by variant; its last conv is
    the stage-0 patch merge."""
    for arch in ShuntedTransformer.arch_zoo:
        sd = {k: torch.empty(v['shape']) for k, v in
              R.manifest(f'shunted-{arch}')['state_dict'].items()}
        renamed = ShuntedTransformer.convert_checkpoint(sd).state_dict
        last = max(int(k.split('.')[2]) for k in sd if k.startswith('patch_embed1.conv.'))
        assert renamed['stages.0.patch_embed.proj.weight'] is sd[f'patch_embed1.conv.{last}.weight']
