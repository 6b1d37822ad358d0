"""The backbone contract, for every registered family (``backbone_contract.py`` holds the
checks; the families' declared facts say what to expect): equality with the official models
on the reference cases, exact parameter counts, any input size, out_indices, frozen stages,
norm_eval, with_cp, channels-last, fused attention, checkpoints and bad input."""
import importlib

import pytest
import torch

import backbone_contract as contract
import reference as R
from mmhat.models.layers import set_fused_attn, use_fused_attn

FAMILIES = contract.families()
IDS = contract.family_ids()
VARIANTS = [(cls, arch) for cls in FAMILIES for arch in cls.arch_zoo]
FUSED_FAMILIES = [cls for cls in FAMILIES if cls.fused_attention]


def reference_name(cls) -> str:
    return f'{cls.reference_name}-{cls.smallest_arch}'


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    """Per family, the official-format checkpoint (``{'model': ...}``) of its reference case."""
    root = tmp_path_factory.mktemp('ckpt')
    return {cls: R.write_official_checkpoint(reference_name(cls), root / f'{cls.__name__}.pth')
            for cls in FAMILIES}


def pretrained(cls, official, **kwargs):
    model = contract.build(cls, init_cfg=dict(type='Pretrained', checkpoint=str(official[cls])),
                           **kwargs)
    model.init_weights()
    return model.eval()


def test_every_family_is_here():
    assert {cls.__name__ for cls in FAMILIES} == {'GroupMixFormer', 'HATNet',
                                                  'ShuntedTransformer', 'TransCNN'}


# ----------------------------------------------------------------------------- reference
PATHS = [(cls, True) for cls in FAMILIES] + [(cls, False) for cls in FUSED_FAMILIES]


@pytest.mark.parametrize('cls,fused', PATHS, ids=[f'{c.__name__}-{"fused" if f else "explicit"}'
                                                  for c, f in PATHS])
def test_equals_official_in_float64(cls, official, fused):
    """Official checkpoint + init_weights + eval, run in float64 as the reference was: every
    stage within 1e-7 of the official outputs (measured ~1e-14), on every attention path
    (fused where there is one, and explicit)."""
    case = R.load_case(reference_name(cls))
    assert case['dtype'] == 'float64'
    model = pretrained(cls, official).double()
    before = use_fused_attn()
    try:
        set_fused_attn(fused)
        with torch.no_grad():
            outs = model(case['input'].double())
    finally:
        set_fused_attn(before)
    assert all(o.dtype == torch.float64 for o in outs)
    R.assert_matches_reference(outs, case['outputs'], rel=R.FLOAT64_REL)


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_equals_official_in_float32_within_its_own_gap(cls, official):
    """As users run it (float32, channels-last, fused attention where there is one): within
    3x the gap between the official model's own float32 and float64 runs."""
    case = R.load_case(reference_name(cls))
    with torch.no_grad():
        outs = pretrained(cls, official)(case['input'])
    R.assert_matches_reference(outs, case['outputs'], rel=R.float32_bars(reference_name(cls)))


@pytest.mark.parametrize('cls,arch', VARIANTS, ids=[f'{c.__name__}-{a}' for c, a in VARIANTS])
def test_parameters_and_keys_equal_official(cls, arch):
    """Exactly the official backbone's parameters (less what the loader drops as unused, e.g.
    HAT-Net's never-called ``attn.proj_norm``), and every official key lands on a model key
    of the same shape."""
    manifest = R.manifest(f'{cls.reference_name}-{arch}')
    conversion = cls.convert_checkpoint({k: torch.empty(v['shape'])
                                         for k, v in manifest['state_dict'].items()})
    unused = sum(torch.Size(manifest['state_dict'][k]['shape']).numel()
                 for k in conversion.dropped
                 if not k.startswith(tuple(manifest['classifier_prefixes'])))
    model = contract.build(cls, arch)
    assert sum(p.numel() for p in model.parameters()) == manifest['params_backbone'] - unused
    assert model.out_channels == list(cls.arch_zoo[arch]['embed_dims'])
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in conversion.state_dict.items()} == own


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_any_size_shapes_and_strides(cls):
    contract.check_shapes_at_sizes(cls)


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_out_indices_select(cls):
    contract.check_out_indices_select(cls)


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_detection_size(cls):
    with torch.no_grad():
        outs = contract.build(cls).eval()(torch.randn(1, 3, 800, 1216))
    assert [tuple(o.shape[-2:]) for o in outs] == [(200, 304), (100, 152), (50, 76), (25, 38)]


# ----------------------------------------------------------------------------- training state
@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_frozen_stages(cls):
    contract.check_frozen_stages(cls)


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_norm_eval(cls):
    contract.check_norm_eval(cls)


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_with_cp_equals_plain_and_every_parameter_learns(cls):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 72)
    contract.check_with_cp_equals_plain(contract.build(cls), x,
                                        **contract.forward_kwargs_for_padding(cls, x))


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_with_cp_reaches_stem_entries_and_blocks(cls):
    contract.check_with_cp_recomputes(cls)


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_drop_path_rises_linearly_over_all_blocks(cls):
    model = contract.build(cls, drop_path_rate=0.1)
    blocks = [b for s in model.stages for b in s.blocks]
    assert type(blocks[0].drop_path).__name__ == 'Identity'  # rate 0: no module, as official
    rates = [b.drop_path.drop_prob for b in blocks[1:]]
    assert rates[-1] == pytest.approx(0.1) and rates == sorted(rates)
    assert len(blocks) == sum(model.arch_settings['depths'])


# ----------------------------------------------------------------------------- layouts, paths
@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_channels_last_equals_nchw(cls):
    x = torch.randn(2, 3, 113, 97)
    contract.check_channels_last_equals_nchw(contract.build(cls), x,
                                             **contract.forward_kwargs_for_padding(cls, x))


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_channels_last_is_a_keyword(cls):
    model = contract.build(cls, channels_last=False)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous() for w in convs)


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_cp_keeps_products_fact(cls):
    """``cp_keeps_products`` says whether some module of the family keeps linear products
    under ``with_cp`` (the benchmark's ``--kernels both`` then times it with and without)."""
    model = contract.build(cls)
    keeping = any(getattr(m, 'keep_products', False) for m in model.modules())
    assert keeping == cls.cp_keeps_products
    from mmhat.utils.benchmark import family_kernel_features
    assert ('attn-replay' in family_kernel_features(cls)) == (
        cls.fused_attention or cls.cp_keeps_products)


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_windowed_attention_fact(cls, monkeypatch):
    """``windowed_attention`` says whether the family's forward attends inside windows
    (the benchmark's ``window-copies`` feature follows it)."""
    attention_module = importlib.import_module('mmhat.models.layers.attention')
    cuts = []
    real = attention_module.window_qkv
    monkeypatch.setattr(attention_module, 'window_qkv', lambda *a: cuts.append(a[1]) or real(*a))
    model = contract.build(cls).train()
    sum(o.sum() for o in model(torch.randn(1, 3, 75, 69))).backward()
    assert bool(cuts) == cls.windowed_attention
    from mmhat.utils.benchmark import family_kernel_features
    assert ('window-copies' in family_kernel_features(cls)) == cls.windowed_attention


def _applied_in_a_training_step(cls, monkeypatch, module: str, function: str) -> int:
    """How often one training step of ``cls`` (75x69, channels-last CPU) applies the
    autograd Function ``function`` of ``mmhat.models.layers.<module>``."""
    fn = getattr(importlib.import_module(f'mmhat.models.layers.{module}'), function)
    calls = []
    real = fn.apply
    monkeypatch.setattr(fn, 'apply', lambda *a: calls.append(a[0].shape) or real(*a))
    model = contract.build(cls).train()
    sum(o.sum() for o in model(torch.randn(1, 3, 75, 69))).backward()
    return len(calls)


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_folded_norms_fact(cls, monkeypatch):
    """``folded_norms`` says whether a training step folds a BatchNorm into an expanding
    1x1 conv (the benchmark's ``norm-fold`` feature follows it)."""
    folded = _applied_in_a_training_step(cls, monkeypatch, 'norm', '_FoldedNorm')
    assert bool(folded) == cls.folded_norms
    from mmhat.utils.benchmark import family_kernel_features
    assert ('norm-fold' in family_kernel_features(cls)) == cls.folded_norms


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_depthwise_kernels_fact(cls, monkeypatch):
    """``depthwise_kernels`` says whether a training step convolves through
    ``layers.depthwise_conv2d``'s 3x3-block weight gradient (the benchmark's ``conv``
    feature follows it, or ``cpu_conv_kernels``)."""
    calls = _applied_in_a_training_step(cls, monkeypatch, 'conv', '_DepthwiseConv')
    assert bool(calls) == cls.depthwise_kernels
    from mmhat.utils.benchmark import family_kernel_features
    assert ('conv' in family_kernel_features(cls)) == (cls.depthwise_kernels
                                                       or cls.cpu_conv_kernels)


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_cpu_conv_kernels_fact_and_equality(cls):
    """``cpu_conv_kernels`` says whether the family builds the CPU training kernels (the
    benchmark's ``--kernels both`` reads it), and the kernels train like ``nn.Conv2d``."""
    from mmhat.models.layers import DepthwiseConv2d, PointwiseConv2d, set_cpu_kernels
    model = contract.build(cls).double().train()
    kinds = {type(m) for m in model.modules()} & {DepthwiseConv2d, PointwiseConv2d}
    assert bool(kinds) == cls.cpu_conv_kernels
    if not kinds:
        return
    x = torch.randn(2, 3, 67, 91, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = []
    for enabled in (True, False):
        set_cpu_kernels(enabled)
        try:
            model.zero_grad(set_to_none=True)
            sum((o * o).sum() for o in model(x)).backward()
        finally:
            set_cpu_kernels(True)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    # a conv bias before a BatchNorm has a zero gradient in exact math: rounding noise only
    floor = 1e-9 * max(g.abs().max().item() for g in grads[1].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-9, atol=floor, msg=name)


@pytest.mark.parametrize('cls', FUSED_FAMILIES, ids=[c.__name__ for c in FUSED_FAMILIES])
def test_with_cp_replays_the_fused_attention_instead_of_recomputing_it(cls, monkeypatch):
    """with_cp keeps each block's fused attention and its recomputation runs no attention
    kernel (``KeptAttention``); with ``set_attention_replay(False)`` it recomputes every
    one; the explicit path is always recomputed. The gradients are the same in all three
    (and the reference path's: tests/test_backbones/test_gradients.py)."""
    from mmhat.models.layers import set_attention_replay
    calls = {'forward': 0, 'backward': 0}
    phase = ['forward']
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls[phase[0]] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', counting_sdpa)
    model = contract.build(cls, with_cp=True).double().train()
    x = torch.randn(1, 3, 75, 69, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen, grads = [], []
    for replay, fused in ((True, True), (False, True), (True, False)):
        calls.update(forward=0, backward=0)
        phase[0] = 'forward'
        set_attention_replay(replay)
        before = use_fused_attn()
        set_fused_attn(fused)
        try:
            model.zero_grad(set_to_none=True)
            loss = sum((o * o).sum() for o in model(x))
            phase[0] = 'backward'
            loss.backward()
        finally:
            set_attention_replay(True)
            set_fused_attn(before)
        seen.append(dict(calls))
        grads.append([p.grad.clone() for p in model.parameters()])
    assert seen[0]['forward'] > 0 and seen[0]['backward'] == 0
    assert seen[1] == {'forward': seen[0]['forward'], 'backward': seen[0]['forward']}
    assert seen[2] == {'forward': 0, 'backward': 0}
    floor = 1e-9 * max(g.abs().max().item() for g in grads[1])
    for a, b, c in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=floor)
        torch.testing.assert_close(c, b, rtol=1e-7, atol=floor)


#: families whose q/k/v projections go through ``layers.attention_input``
ATTENTION_INPUT_FAMILIES = [c for c in FUSED_FAMILIES if c.__name__ in ('HATNet', 'TransCNN')]


@pytest.mark.parametrize('cls', ATTENTION_INPUT_FAMILIES,
                         ids=[c.__name__ for c in ATTENTION_INPUT_FAMILIES])
def test_with_cp_recomputation_skips_the_attention_input_products(cls, monkeypatch):
    """Under with_cp with the fused attention replayed, the q/k/v projections
    (``attention_input``) are not multiplied again in the backward's recomputation: no
    matrix product of the backward adds one of their biases (the forward's does), while
    the output projection's bias still is (it is recomputed: the detector works); the
    gradients equal those of the plain model at an awkward size."""
    from torch.utils._python_dispatch import TorchDispatchMode
    A = importlib.import_module('mmhat.models.layers.attention')  # the package's
    # ``attention`` attribute is the function
    from mmhat.models.layers import PointwiseConv2d
    inputs, own = [], A.conv_with_own_gradients

    def recording(proj, x, compute=None):
        inputs.append(proj)
        return own(proj, x, compute)
    monkeypatch.setattr(A, 'conv_with_own_gradients', recording)

    class BiasesAdded(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ptrs = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.addmm.default:
                self.ptrs.add(args[0].data_ptr())
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = contract.build(cls).double().train()
    x = torch.randn(1, 3, 75, 69, dtype=torch.float64)
    grads = []
    for with_cp in (False, True):
        model.with_cp = with_cp
        model.zero_grad(set_to_none=True)
        inputs.clear()
        loss = sum((o * o).sum() for o in model(x))
        mode = BiasesAdded()
        with mode:
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    projections = {id(m) for m in inputs}
    assert len(projections) >= len(list(model.stages[0].blocks))  # every block's qkv at least
    skipped = {m.bias.data_ptr() for m in model.modules() if id(m) in projections}
    recomputed = {m.bias.data_ptr() for m in model.modules()
                  if isinstance(m, PointwiseConv2d) and m.bias is not None
                  and id(m) not in projections}
    assert not skipped & mode.ptrs
    assert recomputed & mode.ptrs
    floor = 1e-9 * max(g.abs().max().item() for g in grads[0].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-9, atol=floor, msg=n)


def test_kept_attention_refuses_a_recomputation_that_differs():
    from mmhat.models.layers import KeptAttention, attention
    kept, q = KeptAttention(), torch.randn(1, 1, 4, 8)
    with kept.forward():
        out = attention(q, q, q, 0.5)
    with kept.recomputation():
        assert torch.equal(attention(q, q, q, 0.5), out)
        with pytest.raises(RuntimeError, match='more kept outputs .* than its forward kept'):
            attention(q, q, q, 0.5)


@pytest.mark.parametrize('cls', FUSED_FAMILIES, ids=[c.__name__ for c in FUSED_FAMILIES])
def test_fused_equals_explicit_at_padded_sizes(cls):
    torch.manual_seed(0)
    contract.check_fused_equals_explicit(contract.build(cls).eval(), torch.randn(2, 3, 113, 97))


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_fused_attn_argument_only_where_there_is_a_fused_path(cls):
    if cls.fused_attention:
        contract.build(cls, fused_attn=False)
    else:
        with pytest.raises(TypeError, match=r"unexpected arguments \['fused_attn'\]"):
            contract.build(cls, fused_attn=False)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_bad_input(cls):
    contract.check_bad_input(cls)


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_bad_arguments(cls):
    contract.check_bad_arguments(cls)


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize('wrap', contract.WRAPS)
@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_checkpoint_wrappers_load(cls, official, wrap, tmp_path):
    contract.check_checkpoint_wrapper(lambda **kw: contract.build(cls, **kw), official[cls],
                                      wrap, tmp_path)


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_strict_checkpoint_errors(cls, official, tmp_path):
    contract.check_strict_checkpoint_errors(lambda **kw: contract.build(cls, **kw),
                                            official[cls], tmp_path)


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_checkpoint_of_another_family_is_a_clear_error(cls, tmp_path):
    other = next(c for c in FAMILIES if c.reference_name != cls.reference_name
                 and c.__name__ != cls.__name__ and not issubclass(c, cls)
                 and not issubclass(cls, c))
    path = R.write_official_checkpoint(reference_name(other), tmp_path / 'other.pth',
                                       with_case_overrides=False)
    model = contract.build(cls, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    name = cls.__name__
    with pytest.raises(Exception, match=rf"(?s)does not fit {name}:.*(missing|unexpected) "
                       rf"keys: .*Is this a checkpoint of {name} arch="):
        model.init_weights()


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_checkpoint_of_another_variant_is_a_clear_error(cls, official):
    other_arch = next(a for a in cls.arch_zoo if a != cls.smallest_arch)
    model = contract.build(cls, other_arch,
                           init_cfg=dict(type='Pretrained', checkpoint=str(official[cls])))
    with pytest.raises(Exception, match=rf"(?s)does not fit.*arch='{other_arch}'"):
        model.init_weights()


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_converter_is_pure_and_leaves_mmhat_checkpoints_alone(cls):
    sd = R.official_state_dict(reference_name(cls))
    before = dict(sd)
    conversion = cls.convert_checkpoint(sd)
    assert sd.keys() == before.keys() and all(sd[k] is before[k] for k in sd)
    assert conversion.converted and conversion.dropped
    again = cls.convert_checkpoint(conversion.state_dict)
    assert not again.converted and again.state_dict == conversion.state_dict
    assert not again.legacy_renamed


LEGACY = R.DATA.parent / 'legacy' / 'mmhat-0.1.0_state_dict_keys.json'
#: one renamed key per family whose layout changed after mmhat 0.1.0 (old -> new)
LEGACY_EXAMPLES = {
    'HATNet': ('stages.1.downsample.conv.weight', 'stages.1.patch_embed.conv.weight'),
    'TransCNN': ('stages.2.downsample.norm2.running_var', 'stages.2.patch_embed.norm2.running_var'),
    'ShuntedTransformer': ('stages.0.blocks.0.mlp.fc1.weight', 'stages.0.blocks.0.ffn.fc1.weight'),
}


@pytest.mark.parametrize('cls', FAMILIES, ids=IDS)
def test_checkpoints_of_mmhat_0_1_still_load(cls, tmp_path):
    """A checkpoint saved by mmhat 0.1.0 (its keys are recorded in tests/data/legacy) loads
    strictly, through the family's explicit legacy rename rules."""
    import json
    old = json.loads(LEGACY.read_text())[f'{cls.__name__}:{cls.smallest_arch}']
    sd = {k: R.stand_in_tensor(k, shape, 'int64' if k.endswith('num_batches_tracked') else 'f')
          for k, shape in old.items()}
    path = tmp_path / 'old.pth'
    torch.save({'state_dict': sd, 'meta': {}}, path)
    model = contract.build(cls)
    conversion = model.load_pretrained(str(path))
    loaded = model.state_dict()
    if cls.__name__ in LEGACY_EXAMPLES:
        old_key, new_key = LEGACY_EXAMPLES[cls.__name__]
        assert conversion.legacy_renamed[old_key] == new_key
        assert torch.equal(loaded[new_key], sd[old_key])
    else:
        assert not conversion.legacy_renamed
    for old_key, new_key in {k: conversion.legacy_renamed.get(k, k) for k in sd}.items():
        assert torch.equal(loaded[new_key], sd[old_key].to(loaded[new_key].dtype)), old_key


def test_channels_last_default_follows_the_device_type(monkeypatch):
    """``channels_last=None``: the layout of CHANNELS_LAST_ON for the device type the model
    is on, again whenever it moves to another type; True/False and a layout set by hand on
    the same device type stay."""
    from mmhat.models.backbones import base
    cls = FAMILIES[0]

    def channels_last(model):
        """All kxk (k > 1) conv weights channels-last (the channel stride is 1), or all NCHW
        (1x1 weights look the same in both layouts)."""
        strides = {m.weight.stride(1) == 1 for m in model.modules()
                   if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1}
        assert len(strides) == 1, 'mixed layouts'
        return strides.pop()

    assert channels_last(contract.build(cls))  # the measured CPU default
    monkeypatch.setattr(base, 'CHANNELS_LAST_ON', {'cpu': False, 'meta': True})
    model = contract.build(cls)
    assert not channels_last(model)
    model.double()  # no device move: unchanged
    assert not channels_last(model)
    assert channels_last(model.to('meta'))
    fixed = contract.build(cls, channels_last=False).to('meta')
    assert not channels_last(fixed)
    by_hand = contract.build(cls).to(memory_format=torch.channels_last)
    assert channels_last(by_hand)  # set by hand on the same device type: kept
