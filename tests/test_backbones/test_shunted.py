"""Shunted Transformer: variants, equality with the official model, any input size and its
padding rule, training-time contract, checkpoints."""

import pytest
import torch

import backbone_contract as contract
import reference as R
from mmhat.checkpoint import CheckpointError
from mmhat.models.backbones.shunted import (KeyValueBranch, PatchEmbed, ShuntedAttention,
                                            ShuntedTransformer)
from mmhat.registry import MODELS


def build(arch='tiny', **kwargs) -> ShuntedTransformer:
    return MODELS.build(dict(type='mmhat.ShuntedTransformer', arch=arch, **kwargs))


def set_fused(model, fused: bool) -> None:
    for m in model.modules():
        if isinstance(m, ShuntedAttention):
            m.fused = fused


def stage_sizes(H: int, W: int):
    """The contract: stage i has ceil(H / 2**(i+2)) x ceil(W / 2**(i+2)) tokens."""
    return [(-(-H // 2**(i + 2)), -(-W // 2**(i + 2))) for i in range(4)]


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    """The official-format (``{'model': ...}``) stand-in checkpoint of the reference case."""
    path = tmp_path_factory.mktemp('ckpt') / 'shunted-tiny.pth'
    return R.write_official_checkpoint('shunted-tiny', path)


def pretrained(official, **kwargs) -> ShuntedTransformer:
    model = build(init_cfg=dict(type='Pretrained', checkpoint=str(official)), **kwargs)
    model.init_weights()
    return model.eval()


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


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_parameter_count_equals_official(arch):
    model = build(arch)
    assert sum(p.numel() for p in model.parameters()) == R.manifest(f'shunted-{arch}')[
        'params_backbone']
    assert model.out_channels == [64, 128, 256, 512]


# ----------------------------------------------------------------------------- reference
@pytest.mark.parametrize('fused', [True, False])
def test_equals_official(official, fused):
    """Well conditioned: float32 vs float64 differ by < 1e-6 relative at every stage, so
    one thread and either attention path meet the bar (measured ~5e-7)."""
    model = pretrained(official)
    set_fused(model, fused)
    case = R.load_case('shunted-tiny')
    with torch.no_grad():
        R.assert_matches_reference(model(case['input']), case['outputs'])


def test_channels_last_equals_nchw():
    contract.check_channels_last_equals_nchw(build(), torch.randn(2, 3, 113, 97))


# ----------------------------------------------------------------------------- any size
@pytest.mark.parametrize('hw', [(32, 32), (33, 47), (113, 97), (513, 511), (256, 320)])
def test_any_size_shapes_and_strides(hw):
    model = build().eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *hw))
    assert [tuple(o.shape) for o in outs] == [(1, c, h, w) for c, (h, w) in
                                             zip(model.out_channels, stage_sizes(*hw))]
    assert all(torch.isfinite(o).all() for o in outs)


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
    embed = PatchEmbed(8, 8, kernel_size=2, stride=2).eval()
    x = torch.randn(1, 8, 17, 24)
    with torch.no_grad():
        tokens, hw = embed(x)
        x[:, :, 16] += 1
        changed, _ = embed(x)
    assert hw == (9, 12) and tokens.shape == (1, 9 * 12, 8)
    moved = (changed - tokens).abs().amax(dim=(0, 2)).view(9, 12)
    assert (moved[:8] == 0).all() and (moved[8] > 0).all()


# ----------------------------------------------------------------------------- paths
def test_fused_equals_explicit():
    torch.manual_seed(0)
    contract.check_fused_equals_explicit(build().eval(), torch.randn(2, 3, 113, 97))


def test_with_cp_equals_plain_and_every_parameter_learns():
    torch.manual_seed(0)
    contract.check_with_cp_equals_plain(build(drop_path_rate=0.0), torch.randn(2, 3, 64, 72))


def test_with_cp_recomputes_the_stem_and_patch_embeddings_unless_frozen():
    """with_cp reaches the stride-2/4 stem and every patch embedding (their activations are
    among the largest), but a frozen stem is run once: nothing to recompute for."""
    def forward_counts(model):  # pre-hooks: the recomputation stops before forward hooks
        counts = dict(stem=0, embed=0)
        model.stem.register_forward_pre_hook(
            lambda *a: counts.__setitem__('stem', counts['stem'] + 1))
        for stage in model.stages:
            stage.patch_embed.register_forward_pre_hook(
                lambda *a: counts.__setitem__('embed', counts['embed'] + 1))
        outs = model.train()(torch.randn(1, 3, 64, 64))
        sum(o.sum() for o in outs).backward()
        return counts

    assert forward_counts(build(with_cp=False)) == dict(stem=1, embed=4)
    assert forward_counts(build(with_cp=True)) == dict(stem=2, embed=8)
    assert forward_counts(build(with_cp=True, frozen_stages=0)) == dict(stem=1, embed=8)


# ----------------------------------------------------------------------------- training state
def test_frozen_stages():
    model = build(frozen_stages=2).train()
    for m in [model.stem, model.stages[0], model.stages[1]]:
        assert not m.training
        assert all(not p.requires_grad for p in m.parameters())
    for m in model.stages[2:]:
        assert m.training
        assert all(p.requires_grad for p in m.parameters())


def test_frozen_stages_zero_freezes_the_conv_stem_only():
    model = build(frozen_stages=0).train()
    assert not model.stem.training and all(not p.requires_grad for p in model.stem.parameters())
    assert all(p.requires_grad for p in model.stages.parameters())


def test_norm_eval_keeps_stem_batchnorm_statistics():
    x = torch.randn(2, 3, 64, 64)
    model = build(norm_eval=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k}
    model(x)
    assert before and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.stem[0].bn.training and model.stages[0].training
    model = build().train()
    before = {k: v.clone() for k, v in model.state_dict().items() if 'running_mean' in k}
    model(x)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_out_indices_select_stages():
    model = build(out_indices=(1, 3)).eval()
    assert model.out_channels == [128, 512]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [128, 512]


def test_small_inputs_are_refused_clearly():
    with pytest.raises(ValueError, match='at least 32x32 pixels, got 31x64'):
        build()(torch.randn(1, 3, 31, 64))


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_converter_maps_every_official_key(arch):
    """Every official key (head excepted) lands on a model key of the same shape."""
    manifest = R.manifest(f'shunted-{arch}')['state_dict']
    sd = {k: torch.empty(v['shape']) for k, v in manifest.items()}
    conversion = ShuntedTransformer.convert_checkpoint(sd)
    assert set(conversion.dropped) == {'head.weight', 'head.bias'}
    own = {k: tuple(v.shape) for k, v in build(arch).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in conversion.state_dict.items()} == own


def test_converter_is_pure_and_returns_mmhat_checkpoints_unchanged():
    sd = R.official_state_dict('shunted-tiny')
    before = dict(sd)
    conversion = ShuntedTransformer.convert_checkpoint(sd)
    assert sd.keys() == before.keys()
    assert conversion.converted
    renamed = conversion.state_dict
    assert renamed['stages.0.patch_embed.proj.weight'] is sd['patch_embed1.conv.3.weight']
    assert renamed['stem.0.bn.running_var'] is sd['patch_embed1.conv.1.running_var']
    assert renamed['stages.2.blocks.3.attn.branches.1.reduce.weight'] is sd[
        'block3.3.attn.sr2.weight']
    assert renamed['stages.3.blocks.0.attn.local_conv.bias'] is sd['block4.0.attn.local_conv.bias']
    assert renamed['stages.1.blocks.0.mlp.dwconv.weight'] is sd['block2.0.mlp.dwconv.dwconv.weight']
    again = ShuntedTransformer.convert_checkpoint(renamed)
    assert not again.converted and again.state_dict.keys() == renamed.keys()


@pytest.mark.parametrize('wrap', contract.WRAPS)
def test_checkpoint_wrappers_load(tmp_path, official, wrap):
    contract.check_checkpoint_wrapper(build, official, wrap, tmp_path)


def test_checkpoint_of_other_variant_is_a_clear_error(official):
    model = build('small', init_cfg=dict(type='Pretrained', checkpoint=str(official)))
    with pytest.raises(CheckpointError,
                       match=r"(?s)missing keys: stem\.1\.conv\.weight.*arch='small'"):
        model.init_weights()


def test_unexpected_key_is_an_error_not_a_partial_load(tmp_path, official):
    sd = torch.load(official)['model']
    sd['block1.0.attn.extra.weight'] = torch.zeros(3)
    path = tmp_path / 'extra.pth'
    torch.save({'model': sd}, path)
    model = build(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(CheckpointError,
                       match=r'1 unexpected keys: stages\.0\.blocks\.0\.attn\.extra'):
        model.init_weights()
