"""HAT-Net and TransCNN (one implementation, two families): variants, equality with the
official models, any input size, padding invariance, training-time contract, checkpoints."""

import pytest
import torch

import backbone_contract as contract
import reference as R
from mmhat.checkpoint import CheckpointError
from mmhat.models.backbones.hatnet import HATNet, HMHSA
from mmhat.models.backbones.transcnn import TransCNN
from mmhat.registry import MODELS

FAMILIES = {'hatnet': HATNet, 'transcnn': TransCNN}


def build(family: str, arch: str = 'tiny', **kwargs):
    return MODELS.build(dict(type=f'mmhat.{FAMILIES[family].__name__}', arch=arch, **kwargs))


def set_fused(model, fused: bool) -> None:
    for m in model.modules():
        if isinstance(m, HMHSA):
            m.fused = fused


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    """Official-format checkpoint files (``{'model': ...}``) of the reference cases."""
    root = tmp_path_factory.mktemp('ckpt')
    return {f: R.write_official_checkpoint(f'{f}-tiny', root / f'{f}-tiny.pth') for f in FAMILIES}


def pretrained(family, official, **kwargs):
    model = build(family, init_cfg=dict(type='Pretrained', checkpoint=str(official[family])),
                  **kwargs)
    model.init_weights()
    return model.eval()


# ----------------------------------------------------------------------------- variants
def test_arch_dict_builds_custom_variant():
    arch = dict(HATNet.arch_zoo['tiny'], depths=(1, 1, 1, 1))
    model = build('hatnet', arch=arch)
    assert [len(s.blocks) for s in model.stages] == [1, 1, 1, 1]


@pytest.mark.parametrize('family,arch', [(f, a) for f in FAMILIES
                                         for a in ('tiny', 'small', 'medium', 'large')])
def test_parameter_count_equals_official(family, arch):
    manifest = R.manifest(f'{family}-{arch}')
    # HAT-Net's attn.proj_norm exists in the official model but its forward never uses it;
    # the loader drops it (keeping it would need DDP's find_unused_parameters).
    unused = sum(torch.Size(v['shape']).numel() for k, v in manifest['state_dict'].items()
                 if '.attn.proj_norm.' in k)
    assert (family == 'hatnet') == (unused > 0)
    model = build(family, arch)
    assert sum(p.numel() for p in model.parameters()) == manifest['params_backbone'] - unused
    assert model.out_channels == list(FAMILIES[family].arch_zoo[arch]['embed_dims'])


# ----------------------------------------------------------------------------- reference
@pytest.mark.parametrize('fused', [True, False])
def test_hatnet_equals_official(official, fused):
    model = pretrained('hatnet', official)
    set_fused(model, fused)
    case = R.load_case('hatnet-tiny')
    with torch.no_grad():
        R.assert_matches_reference(model(case['input']), case['outputs'])


def test_transcnn_equals_official(official, num_threads):
    """The TransCNN-T stand-in is ill-conditioned in stages 3-4 (near one-hot softmax over
    logits in the hundreds: our own float32 and float64 outputs differ by 2e-3 there), so
    only the official operation order (explicit path, logits scaled after q k^T, NCHW conv
    weights) at the thread count the reference was made with (2) reproduces it; it then
    agrees bit for bit. (Channels-last convolutions round differently, by 2e-3 relative in
    stage 3 here; ``test_channels_last_equals_nchw`` holds that layout to the NCHW one.)
    """
    num_threads(2)
    model = pretrained('transcnn', official).to(memory_format=torch.contiguous_format)
    set_fused(model, False)
    case = R.load_case('transcnn-tiny')
    with torch.no_grad():
        outs = model(case['input'])
    # Stages 1-2 at the usual bar. Bit-for-bit agreement in stages 3-4 holds only on the CPU
    # the reference was made on: on another host's kernels stage 3 was off by 4.7e-3 of
    # max|ref| (2e-2 still fails structural errors, which are O(1)) and stage 4, whose
    # near one-hot softmax amplifies any rounding, by 0.17 (cosine 0.996 to the reference).
    # A miswired stage-4 layer (one weight reversed) measured cosine 0.43-0.71; 0.99 is the bar.
    R.assert_matches_reference(outs[:2], case['outputs'][:2])
    R.assert_matches_reference(outs[2:3], case['outputs'][2:3], rel=2e-2)
    ref4 = case['outputs'][3]
    assert outs[3].shape == ref4.shape
    cos = torch.nn.functional.cosine_similarity(outs[3].flatten(), ref4.flatten(), dim=0)
    assert cos >= 0.99, f'stage 4: cosine {cos:.4f} to the official output < 0.99'


def test_transcnn_fused_equals_official_where_well_conditioned(official):
    model = pretrained('transcnn', official, out_indices=(0, 1))
    case = R.load_case('transcnn-tiny')
    with torch.no_grad():
        R.assert_matches_reference(model(case['input']), case['outputs'][:2])


@pytest.mark.parametrize('family', FAMILIES)
def test_channels_last_equals_nchw(family):
    contract.check_channels_last_equals_nchw(build(family), torch.randn(2, 3, 113, 97))


# ----------------------------------------------------------------------------- any size
@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('hw', [(33, 47), (113, 97), (513, 511), (32, 32)])
def test_any_size_shapes_and_strides(family, hw):
    model = build(family).eval()
    H, W = hw
    with torch.no_grad():
        outs = model(torch.randn(1, 3, H, W))
    h, w = -(-H // 4), -(-W // 4)
    for out, c in zip(outs, model.out_channels):
        assert out.shape == (1, c, h, w)
        assert torch.isfinite(out).all()
        h, w = -(-h // 2), -(-w // 2)


def test_detection_size_800x1216():
    model = build('hatnet').eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 800, 1216))
    assert [tuple(o.shape[-2:]) for o in outs] == [(200, 304), (100, 152), (50, 76), (25, 38)]


@pytest.mark.parametrize('family', FAMILIES)
def test_outputs_do_not_depend_on_internal_padding(family, monkeypatch):
    """Padding every grid attention further (whole extra cells of padding) changes nothing."""
    model = build(family).eval()
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        ref = model(x)
        minimal = HMHSA.grid_attention

        def padded_more(self, qkv, fused, padded_hw=None):
            H, W = qkv.shape[-2:]
            G = self.grid_size
            return minimal(self, qkv, fused, (-(-H // G) * G + G, -(-W // G) * G + 2 * G))

        monkeypatch.setattr(HMHSA, 'grid_attention', padded_more)
        more = model(x)
    for a, b in zip(ref, more):  # exact in exact arithmetic; float32 rounding differs
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_padding_is_masked_not_attended():
    """Keys of padded positions get no weight: a query's output equals attention computed
    over its cell's valid tokens only."""
    torch.manual_seed(0)
    attn = HMHSA(16, 2, grid_size=4, ds_ratio=2, norm_cfg=dict(type='GN', num_groups=1)).eval()
    qkv = torch.randn(1, 48, 5, 6)
    out = attn.grid_attention(qkv, fused=False)
    # Cell (1, 1) covers rows 4..7, cols 4..7; valid rows 4, cols 4..5.
    cell = qkv[:, :, 4:5, 4:6].reshape(1, 3, 2, 8, 2).permute(0, 1, 2, 4, 3)  # (1, 3, h, N, d)
    q, k, v = cell.unbind(1)
    expected = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1) @ v  # (1, h, 2, d)
    got = out[:, :, 4, 4:6].reshape(1, 2, 8, 2).permute(0, 1, 3, 2)  # (1, h, 2, d)
    torch.testing.assert_close(got, expected)


def test_global_keys_pool_valid_pixels_only():
    """ceil-mode pooling: a border key is the mean of its valid pixels (no padded zeros)."""
    g = torch.randn(1, 4, 9, 10)
    pooled = torch.nn.functional.avg_pool2d(g, 4, 4, ceil_mode=True)
    assert pooled.shape[-2:] == (3, 3)
    torch.testing.assert_close(pooled[..., 2, 2], g[..., 8:, 8:].mean((-2, -1)))


@pytest.mark.parametrize('family', FAMILIES)
def test_divisible_input_is_not_padded(family, monkeypatch):
    """At sizes the official code accepts, the grid attention never pads."""
    calls = []
    original = torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, 'pad', lambda *a, **k: calls.append(1) or original(*a, **k))
    size = 224 if family == 'hatnet' else 256
    with torch.no_grad():
        build(family).eval()(torch.randn(1, 3, size, size))
    assert calls == []


# ----------------------------------------------------------------------------- paths
@pytest.mark.parametrize('family', FAMILIES)
def test_fused_equals_explicit_with_masks(family):
    torch.manual_seed(0)
    contract.check_fused_equals_explicit(build(family).eval(), torch.randn(2, 3, 113, 97))


@pytest.mark.parametrize('family', FAMILIES)
def test_with_cp_equals_plain_and_every_parameter_learns(family):
    torch.manual_seed(0)
    contract.check_with_cp_equals_plain(build(family), torch.randn(2, 3, 64, 72))


# ----------------------------------------------------------------------------- training state
@pytest.mark.parametrize('family', FAMILIES)
def test_frozen_stages(family):
    model = build(family, frozen_stages=2).train()
    frozen = [model.stem, model.stages[0], model.stages[1]]
    for m in frozen:
        assert not m.training
        assert all(not p.requires_grad for p in m.parameters())
    for m in model.stages[2:]:
        assert m.training
        assert all(p.requires_grad for p in m.parameters())


def test_norm_eval_keeps_batchnorm_statistics():
    model = build('transcnn', norm_eval=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k}
    model(torch.randn(2, 3, 64, 64))
    after = model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    # without norm_eval the statistics move
    model = build('transcnn').train()
    before = {k: v.clone() for k, v in model.state_dict().items() if 'running_mean' in k}
    model(torch.randn(2, 3, 64, 64))
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_out_indices_select_stages():
    model = build('hatnet', out_indices=(1, 3)).eval()
    assert model.out_channels == [96, 384]
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [96, 384]


# ----------------------------------------------------------------------------- checkpoints
def test_converter_drops_and_names_unused_keys():
    sd = R.official_state_dict('hatnet-tiny')
    before = dict(sd)
    conversion = HATNet.convert_checkpoint(sd)
    assert sd.keys() == before.keys()  # pure: the input is not modified
    assert conversion.converted
    assert set(conversion.dropped) == {k for k in sd if k.startswith('classifier.')
                                       or '.attn.proj_norm.' in k}
    assert 'stages.2.blocks.5.ffn.pre_norm.weight' in conversion.state_dict
    assert 'stages.1.downsample.conv.weight' in conversion.state_dict
    # already mmhat: returned unchanged
    again = HATNet.convert_checkpoint(conversion.state_dict)
    assert not again.converted and again.state_dict.keys() == conversion.state_dict.keys()


@pytest.mark.parametrize('wrap', contract.WRAPS)
def test_checkpoint_wrappers_load(tmp_path, official, wrap):
    contract.check_checkpoint_wrapper(lambda **kw: build('hatnet', **kw), official['hatnet'], wrap,
                                      tmp_path)


def test_checkpoint_of_other_variant_is_a_clear_error(official):
    model = build('hatnet', arch='small', init_cfg=dict(type='Pretrained',
                                                         checkpoint=str(official['hatnet'])))
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatches: stem.conv2.weight.*"
                       r"missing keys: .*arch='small'"):
        model.init_weights()


def test_unexpected_key_is_an_error_not_a_partial_load(tmp_path, official):
    sd = torch.load(official['hatnet'])['model']
    sd['blocks.0.0.attn.extra.weight'] = torch.zeros(3)
    path = tmp_path / 'extra.pth'
    torch.save({'model': sd}, path)
    model = build('hatnet', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(CheckpointError, match=r'1 unexpected keys: stages.0.blocks.0.attn.extra'):
        model.init_weights()
