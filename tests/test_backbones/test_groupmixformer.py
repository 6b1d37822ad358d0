"""GroupMixFormer: what is its own, on top of the contract every family passes
(``test_contract.py``): width rules, the official scale, the factorised attention, padding
invariance with ``valid_sizes`` and the official key names."""

import pytest
import torch
import torch.nn.functional as F

import reference as R
from mmhat.models.backbones.groupmixformer import (GroupMixAttention, GroupMixFormer,
                                                   factorized_attention, valid_mask)
from mmhat.registry import MODELS


def build(arch: str = 'mini', **kwargs) -> GroupMixFormer:
    return MODELS.build(dict(type='mmhat.GroupMixFormer', arch=arch, **kwargs))


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
    with pytest.raises(ValueError, match=r'CRPE windows .* cover 8 heads, but num_heads is 4'):
        build(dict(GroupMixFormer.arch_zoo['mini'], num_heads=(4, 8, 8, 8)))


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


def channels_first(t: torch.Tensor) -> torch.Tensor:
    """``(B, h, N, d)`` -> ``(B, h*d, N)``, channel ``head * d + j``."""
    B, h, N, d = t.shape
    return t.transpose(-2, -1).reshape(B, h * d, N)


def test_factorized_attention_is_softmax_over_tokens_per_head():
    torch.manual_seed(0)
    q, k, v, bias = torch.randn(4, 2, 3, 10, 5).unbind(0)  # each (B, h, N, d)
    expected = 0.3 * torch.einsum('bhnk,bhkv->bhnv', q,
                                  torch.einsum('bhnk,bhnv->bhkv', k.softmax(dim=2), v)) + bias
    q, k, v, bias, expected = map(channels_first, (q, k, v, bias, expected))
    torch.testing.assert_close(factorized_attention(q, k, v, 3, 0.3, bias=bias), expected)
    torch.testing.assert_close(factorized_attention(q, k, v, 3, 0.3), expected - bias)


def test_factorized_attention_mask_equals_dropping_tokens():
    """Masked tokens take no part in the context: the result equals attention over the
    kept tokens only."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 8, 10).unbind(0)  # each (B, h*d, N), 2 heads of 4
    keep = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    out = factorized_attention(q, k, v, 2, 0.5, key_mask=keep.view(1, 1, 10))
    kept = factorized_attention(q, k[..., keep], v[..., keep], 2, 0.5)
    torch.testing.assert_close(out, kept)


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


def test_valid_region_shrinks_with_the_conv_chain():
    """A stride-``s`` chain of same-padded convs keeps ``ceil(h / s)`` valid rows."""
    mask = valid_mask(((33, 47), (64, 64)), 8, (8, 8), torch.device('cpu'))
    assert mask.shape == (2, 1, 8, 8)
    assert mask[0, 0].sum(0).max() == 5 and mask[0, 0].sum(1).max() == 6  # ceil(33/8), ceil(47/8)
    assert mask[1].all()
    assert valid_mask(None, 4, (8, 8), torch.device('cpu')) is None


@pytest.mark.parametrize('sizes,match', [([(64, 64)], '1 entries for a batch of 2'),
                                         ([(64, 64), (65, 10)], r'\[\(65, 10\)\] do not fit'),
                                         ([(0, 5), (64, 64)], r'\[\(0, 5\)\] do not fit')])
def test_bad_valid_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        build()(torch.randn(2, 3, 64, 64), valid_sizes=sizes)


# ----------------------------------------------------------------------------- checkpoints
def test_converter_names_the_official_keys():
    sd = R.official_state_dict('groupmixformer-mini')
    conversion = GroupMixFormer.convert_checkpoint(sd)
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
    assert torch.equal(new['stages.3.blocks.0.ffn.fc1.weight'],
                       sd['groupmixformer_backbone.3.gma_stage.0.mlp.fc1.weight'])


def test_attention_module_alone():
    """The attention on its own: tokens in, tokens out, any map size."""
    attn = GroupMixAttention(40, 8, norm_cfg=dict(type='BN'), act_cfg=dict(type='HSwish')).eval()
    assert attn(torch.randn(2, 5 * 7, 40), (5, 7)).shape == (2, 35, 40)


# ----------------------------------------------------------------------------- with_cp
def _backward_gemm_widths(model, x, valid_sizes=None):
    """The parameter gradients of one step, and the output widths of every ``addmm`` (a
    forward linear layer with bias: under with_cp, the recomputation's) of its backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Widths(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.widths = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.addmm.default:
                self.widths.append(out.shape[-1])
            return out

    model.zero_grad(set_to_none=True)
    loss = sum((o * o).sum() for o in model(x, valid_sizes=valid_sizes))
    mode = Widths()
    with mode:
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, mode.widths


@pytest.mark.parametrize('valid_sizes', [None, [(70, 61)]])
def test_with_cp_keeps_the_last_stages_products(valid_sizes):
    """Under with_cp, the blocks of stages 3-4 (KEEP_PRODUCTS_FROM_STAGE; mini: 160
    channels) keep their qkv and fc1 products from the forward: the recomputation multiplies
    neither again (no backward GEMM of their widths, 3 x 32 and 4 x 160), the narrower
    blocks still do, and the gradients equal the plain step's in float64 at an awkward
    size, with and without padding."""
    from mmhat.models.backbones import groupmixformer as G
    torch.manual_seed(0)
    model = build(drop_path_rate=0.).double().train()
    keeping = [m for m in model.modules() if getattr(m, 'keep_products', False)]
    assert len(keeping) == 2 * (12 + 4)  # attention and FFN of the stage-3 and -4 blocks
    assert all(b.attn.keep_products == b.ffn.keep_products == (i >= G.KEEP_PRODUCTS_FROM_STAGE)
               for i, s in enumerate(model.stages) for b in s.blocks)
    assert GroupMixFormer.cp_keeps_products
    x = torch.randn(1, 3, 75, 69, dtype=torch.float64)
    plain, _ = _backward_gemm_widths(model, x, valid_sizes)
    model.with_cp = True
    kept, widths = _backward_gemm_widths(model, x, valid_sizes)
    assert 3 * 32 not in widths and 4 * 160 not in widths
    assert 3 * 16 in widths and 4 * 80 in widths  # stage 2 is recomputed
    for m in keeping:
        m.keep_products = False
    _, recomputed = _backward_gemm_widths(model, x, valid_sizes)
    assert 3 * 32 in recomputed and 4 * 160 in recomputed
    floor = 1e-9 * max(g.abs().max().item() for g in plain.values())
    for n, g in plain.items():
        torch.testing.assert_close(kept[n], g, rtol=1e-9, atol=floor, msg=n)


def test_kept_products_are_plain_linear_outside_a_checkpoint_and_not_under_inplace_acts():
    from mmhat.models.backbones.groupmixformer import Mlp
    from mmhat.models.layers import KeptAttention, kept_linear
    x, w, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64), \
        torch.randn(3, dtype=torch.float64)
    assert torch.equal(kept_linear(x, w, b), F.linear(x, w, b))
    kept = KeptAttention()
    with kept.forward():
        out = kept_linear(x, w, b)
    assert len(kept.outputs) == 1 and torch.equal(kept.outputs[0], out)
    with kept.recomputation():
        again = kept_linear(torch.zeros_like(x), w, b)  # the product is not computed again
        assert torch.equal(again, out)
        with pytest.raises(RuntimeError, match='more kept outputs'):
            kept_linear(x, w, b)
    assert Mlp(160, 640, dict(type='GELU'), keep_products=True).keep_products
    assert not Mlp(160, 640, dict(type='ReLU', inplace=True), keep_products=True).keep_products
    assert not Mlp(160, 640, dict(type='GELU')).keep_products
