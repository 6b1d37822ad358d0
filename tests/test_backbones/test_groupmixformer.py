"""GroupMixFormer: variants, equality with the official model, the factorised attention,
any input size, padding invariance with ``valid_sizes``, training-time contract,
checkpoints."""

import pytest
import torch
import torch.nn.functional as F

import backbone_contract as contract
import reference as R
from mmhat.checkpoint import CheckpointError
from mmhat.models.backbones.groupmixformer import (GroupMixAttention, GroupMixFormer,
                                                   factorized_attention)
from mmhat.registry import MODELS

ARCHS = ('mini', 'tiny', 'small', 'base', 'large')


def build(arch: str = 'mini', **kwargs) -> GroupMixFormer:
    return MODELS.build(dict(type='mmhat.GroupMixFormer', arch=arch, **kwargs))


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    """The official-format checkpoint (``{'model': ...}``) of the reference case."""
    root = tmp_path_factory.mktemp('ckpt')
    return R.write_official_checkpoint('groupmixformer-mini', root / 'groupmixformer-mini.pth')


def pretrained(official, **kwargs) -> GroupMixFormer:
    model = build(init_cfg=dict(type='Pretrained', checkpoint=str(official)), **kwargs)
    model.init_weights()
    return model.eval()


def stage_sizes(H: int, W: int):
    """The conv chain: ``ceil(H / 4)``, then halving with ceil."""
    h, w = -(-H // 4), -(-W // 4)
    sizes = []
    for _ in range(4):
        sizes.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return sizes


# ----------------------------------------------------------------------------- variants
def test_arch_dict_builds_custom_variant():
    arch = dict(GroupMixFormer.arch_zoo['mini'], depths=(1, 1, 1, 1), embed_dims=(20, 40, 60, 80))
    model = build(arch).eval()
    assert [len(s.blocks) for s in model.stages] == [1, 1, 1, 1]
    assert model.out_channels == [20, 40, 60, 80]
    assert [o.shape[1] for o in model(torch.randn(1, 3, 32, 32))] == [20, 40, 60, 80]


@pytest.mark.parametrize('embed_dims,match', [
    ((42, 80, 160, 160), r'embed_dims 42 must be divisible by 5 \(one segment each for the '
     r'token level, the 3 group proxies \(3, 5, 7\) and the local branch\)'),
    ((40, 80, 25, 160), r'attention part of embed_dims 25 .*20 channels.* divisible by '
     r'num_heads 8; embed_dims must be a multiple of 10'),
])
def test_embed_dims_not_divisible_is_a_clear_error(embed_dims, match):
    with pytest.raises(ValueError, match=match):
        build(dict(GroupMixFormer.arch_zoo['mini'], embed_dims=embed_dims))


def test_heads_must_match_the_crpe_split():
    with pytest.raises(ValueError, match=r'crpe_windows .* cover 8 heads, but num_heads is 4'):
        build(dict(GroupMixFormer.arch_zoo['mini'], num_heads=(4, 8, 8, 8)))


@pytest.mark.parametrize('arch', ARCHS)
def test_parameter_count_equals_official(arch):
    """Exactly the official backbone (the model less ``head`` and ``norm4``); the official
    large has 71.8M parameters in all (its README says 70.3M): we follow the code."""
    model = build(arch)
    manifest = R.manifest(f'groupmixformer-{arch}')
    assert sum(p.numel() for p in model.parameters()) == manifest['params_backbone']
    assert model.out_channels == list(GroupMixFormer.arch_zoo[arch]['embed_dims'])


def test_official_scale_uses_embed_dims_over_heads():
    """``(D // heads) ** -0.5``, not the head width: mini stage 0 has D = 40, 8 heads of 4
    channels, and scale 5 ** -0.5."""
    attn = build().stages[0].blocks[0].attn
    assert attn.head_dims == 4 and attn.segment_dims == 8
    assert attn.scale == pytest.approx(5**-0.5)


def test_syncbn_config_builds():
    model = build(norm_cfg=dict(type='SyncBN'))
    kinds = {type(m).__name__ for m in model.modules()}
    assert 'SyncBatchNorm' in kinds and 'BatchNorm2d' not in kinds


# ----------------------------------------------------------------------------- reference
def test_equals_official(official):
    """Registry build + Pretrained official checkpoint + init_weights + eval. (Well
    conditioned: our float32 and float64 outputs agree to 2e-6 relative, so no thread
    count or operation order needs pinning.)"""
    model = pretrained(official)
    case = R.load_case('groupmixformer-mini')
    with torch.no_grad():
        R.assert_matches_reference(model(case['input']), case['outputs'])


def test_factorized_attention_is_softmax_over_tokens():
    torch.manual_seed(0)
    q, k, v, bias = torch.randn(4, 2, 3, 10, 5).unbind(0)  # each (B, h, N, d)
    expected = 0.3 * torch.einsum('bhnk,bhkv->bhnv', q,
                                  torch.einsum('bhnk,bhnv->bhkv', k.softmax(dim=2), v)) + bias
    torch.testing.assert_close(factorized_attention(q, k, v, 0.3, bias=bias), expected)
    torch.testing.assert_close(factorized_attention(q, k, v, 0.3), expected - bias)


def test_factorized_attention_mask_equals_dropping_tokens():
    """Masked tokens take no part in the context: the result equals attention over the
    kept tokens only."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 10, 4).unbind(0)
    keep = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    out = factorized_attention(q, k, v, 0.5, key_mask=keep.view(1, 1, 10, 1))
    kept = factorized_attention(q, k[:, :, keep], v[:, :, keep], 0.5)
    torch.testing.assert_close(out, kept)


def test_channels_last_equals_nchw():
    contract.check_channels_last_equals_nchw(build(), torch.randn(2, 3, 113, 97))


# ----------------------------------------------------------------------------- any size
@pytest.mark.parametrize('hw', [(33, 47), (113, 97), (513, 511), (32, 32)])
def test_any_size_shapes_and_strides(hw):
    """The official model asserts at every size that is not a multiple of 32; the stage
    sizes here are the convs' real output sizes."""
    model = build().eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *hw))
    assert [tuple(o.shape[-2:]) for o in outs] == stage_sizes(*hw)
    assert [o.shape[1] for o in outs] == model.out_channels
    assert all(torch.isfinite(o).all() for o in outs)


# ----------------------------------------------------------------------------- padding
def pad_to(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    return F.pad(x, (0, W - x.shape[-1], 0, H - x.shape[-2]))


def crop_like(outs, refs):
    return [o[..., :r.shape[-2], :r.shape[-1]] for o, r in zip(outs, refs)]


@pytest.mark.parametrize('hw,padded', [((33, 47), (64, 96)), ((64, 64), (96, 128))])
def test_valid_sizes_make_padding_invisible(hw, padded):
    """Eval mode, padded image + its valid size == the un-padded image alone, at every
    stage (the second case: an input already divisible by 32, padded further)."""
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        ref = model(x)
        out = model(pad_to(x, *padded), valid_sizes=[hw])
    for o, r in zip(crop_like(out, ref), ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5 * r.abs().max().item())


def test_valid_sizes_in_a_batch_of_different_images():
    """mmdet-style batch padding: each image's outputs equal its own un-padded outputs."""
    torch.manual_seed(0)
    model = build().eval()
    images = [torch.randn(1, 3, 40, 70), torch.randn(1, 3, 65, 33)]
    batch = torch.cat([pad_to(im, 65, 70) for im in images])
    with torch.no_grad():
        outs = model(batch, valid_sizes=[im.shape[-2:] for im in images])
        for b, im in enumerate(images):
            ref = model(im)
            for o, r in zip(crop_like([o[b:b + 1] for o in outs], ref), ref):
                torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5 * r.abs().max().item())


def test_padding_without_valid_sizes_changes_outputs():
    """What the docstring says is *not* invariant: plain zero padding is computed on (the
    token softmax runs over padded tokens too), as in the official model."""
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = crop_like(model(pad_to(x, 64, 128)), ref)
    assert (out[-1] - ref[-1]).abs().max() > 1e-3 * ref[-1].abs().max()


def test_full_valid_sizes_take_the_plain_path():
    model = build().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(model(x), model(x, valid_sizes=[(64, 96), (64, 96)])):
            assert torch.equal(a, b)


@pytest.mark.parametrize('sizes,match', [([(64, 64)], '1 entries for a batch of 2'),
                                         ([(64, 64), (65, 10)], r'\[\(65, 10\)\] do not fit'),
                                         ([(0, 5), (64, 64)], r'\[\(0, 5\)\] do not fit')])
def test_bad_valid_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        build()(torch.randn(2, 3, 64, 64), valid_sizes=sizes)


# ----------------------------------------------------------------------------- training
def test_with_cp_equals_plain_and_every_parameter_learns():
    torch.manual_seed(0)
    contract.check_with_cp_equals_plain(build(), torch.randn(2, 3, 64, 72),
                                        valid_sizes=[(64, 72), (50, 61)])


def test_drop_path_rises_linearly_over_all_blocks():
    model = build(drop_path_rate=0.1)
    rates = [b.drop_path.drop_prob for s in model.stages for b in s.blocks[1:]]
    assert model.stages[0].blocks[0].drop_path.__class__.__name__ == 'Identity'
    assert rates[-1] == pytest.approx(0.1) and rates == sorted(rates)


def test_frozen_stages():
    model = build(frozen_stages=2).train()
    for m in [model.stem, model.stages[0], model.stages[1]]:
        assert not m.training
        assert all(not p.requires_grad for p in m.parameters())
    for m in model.stages[2:]:
        assert m.training
        assert all(p.requires_grad for p in m.parameters())


def test_norm_eval_keeps_batchnorm_statistics():
    model = build(norm_eval=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k}
    model(torch.randn(2, 3, 64, 64))
    after = model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    assert model.stages[3].blocks[0].norm1.training  # LayerNorms are not affected
    model = build().train()  # without norm_eval the statistics move
    before = {k: v.clone() for k, v in model.state_dict().items() if 'running_mean' in k}
    model(torch.randn(2, 3, 64, 64))
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_out_indices_select_stages():
    model = build(out_indices=(1, 3)).eval()
    assert model.out_channels == [80, 160]
    outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outs] == [(80, 8, 8), (160, 2, 2)]


def test_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match='at least 32x32 pixels, got 31x64'):
        build()(torch.randn(1, 3, 31, 64))


# ----------------------------------------------------------------------------- checkpoints
def test_converter_renames_and_drops_classifier():
    sd = R.official_state_dict('groupmixformer-mini')
    before = dict(sd)
    conversion = GroupMixFormer.convert_checkpoint(sd)
    assert sd.keys() == before.keys()  # pure: the input is not modified
    assert conversion.converted
    assert set(conversion.dropped) == {k for k in sd if k.startswith(('head.', 'norm4.'))}
    assert conversion.state_dict.keys() == build().state_dict().keys()
    new = conversion.state_dict
    b = 'groupmixformer_backbone.2.gma_stage.11.att.'
    assert torch.equal(new['stages.2.blocks.11.attn.aggregator.proxy_branches.2.conv.depthwise'
                           '.weight'], sd[b + 'aggregator.agg3.conv1.weight'])
    assert torch.equal(new['stages.2.blocks.11.attn.local_branch.norm.bias'],
                       sd[b + 'aggregator.agg0.norm.bias'])
    assert torch.equal(new['stages.2.blocks.11.attn.crpe.convs.1.weight'],
                       sd[b + 'crpe.conv_list.1.weight'])
    assert torch.equal(new['stages.1.patch_embed.proj.pointwise.weight'],
                       sd['patch_embed_layers.1.proj.pointwise_conv.weight'])
    again = GroupMixFormer.convert_checkpoint(new)  # already mmhat: unchanged
    assert not again.converted and again.state_dict.keys() == new.keys()


@pytest.mark.parametrize('wrap', contract.WRAPS)
def test_checkpoint_wrappers_load(tmp_path, official, wrap):
    contract.check_checkpoint_wrapper(build, official, wrap, tmp_path)


def test_checkpoint_of_other_variant_is_a_clear_error(official):
    model = build('tiny', init_cfg=dict(type='Pretrained', checkpoint=str(official)))
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatches: stem.conv1.weight.*"
                       r"missing keys: stages.0.blocks.3.*arch='tiny'"):
        model.init_weights()


def test_attention_module_alone():
    """The attention on its own: tokens in, tokens out, any map size."""
    attn = GroupMixAttention(40, 8, norm_cfg=dict(type='BN'), act_cfg=dict(type='HSwish')).eval()
    assert attn(torch.randn(2, 5 * 7, 40), (5, 7)).shape == (2, 35, 40)
