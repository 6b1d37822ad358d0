"""What every mmhat backbone must do, written once.

Each check takes a family class (any :class:`~mmhat.models.backbones.base.PyramidBackbone`
subclass, registered or not) or a model built from one, and reads the family's declared
facts (``smallest_arch``, ``stage_size``, ``fused_attention``, ...) instead of a table:
``test_backbones/test_contract.py`` runs them for every registered family, and
``test_backbones/test_toy_family.py`` for a fifth family defined inside the test.
"""
import argparse
import copy
import inspect
from typing import Callable, Dict, List

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import mmhat.models  # noqa: F401  registers the families
from mmhat.checkpoint import CheckpointError
from mmhat.models.backbones import registered_families
from mmhat.models.backbones.base import PyramidBackbone

#: the checkpoint layouts a backbone must load (see mmhat.checkpoint.extract_state_dict)
WRAPS = ['model', 'model_with_args', 'state_dict', 'module_prefix', 'backbone_prefix',
         'mmhat_format']
#: square, non-square, odd and the smallest sizes (height, width)
ODD_SIZES = [(32, 32), (33, 47), (113, 97), (513, 511)]


def families() -> List[type]:
    """Every backbone family registered in mmhat's registry, in registration order."""
    return registered_families()


def family_ids() -> List[str]:
    return [cls.__name__ for cls in families()]


def build(cls: type, arch=None, **kwargs) -> PyramidBackbone:
    """The family's ``arch`` (default: its smallest variant), built through its class."""
    return cls(arch=cls.smallest_arch if arch is None else arch, **kwargs)


def forward_kwargs_for_padding(cls: type, x: torch.Tensor) -> Dict:
    """Extra forward arguments a family takes (GroupMixFormer's ``valid_sizes``): the
    contract runs them too where a family has them."""
    params = inspect.signature(cls.forward_extras).parameters
    if 'valid_sizes' in params:
        B, _, H, W = x.shape
        return dict(valid_sizes=[(H, W)] + [(H - 7, W - 5)] * (B - 1))
    return {}


# ----------------------------------------------------------------------------- shapes
def check_shapes_at_sizes(cls: type, sizes=ODD_SIZES) -> None:
    """Stage ``i`` has ``embed_dims[i]`` channels and ``cls.stage_size`` rows/columns,
    finite values, at every size."""
    model = build(cls).eval()
    for H, W in sizes:
        with torch.no_grad():
            outs = model(torch.randn(1, 3, H, W))
        expected = [(1, c, cls.stage_size(H, i), cls.stage_size(W, i))
                    for i, c in zip(model.out_indices, model.out_channels)]
        assert [tuple(o.shape) for o in outs] == expected, f'{H}x{W}'
        assert all(torch.isfinite(o).all() for o in outs), f'{H}x{W}: non-finite'
        assert all(o.is_contiguous() for o in outs), f'{H}x{W}: outputs must be contiguous NCHW'


def check_out_indices_select(cls: type) -> None:
    """A subset of stages returns, bit for bit, those stages of the full model."""
    torch.manual_seed(0)
    full = build(cls).eval()
    part = build(cls, out_indices=(1, 3)).eval()
    part.load_state_dict(full.state_dict())
    dims = full.arch_settings['embed_dims']
    assert part.out_channels == [dims[1], dims[3]]
    x = torch.randn(1, 3, 64, 72)
    with torch.no_grad():
        a, b = full(x), part(x)
    assert len(b) == 2 and torch.equal(b[0], a[1]) and torch.equal(b[1], a[3])


# ----------------------------------------------------------------------------- training state
def check_frozen_stages(cls: type) -> None:
    """``frozen_stages=k``: the stem and stages ``0..k-1`` fixed and in eval mode; the rest
    trains (a training step runs, with ``k = 0`` too: the first trained layer then gets an
    input that needs no gradient)."""
    for k in (0, 2):
        model = build(cls, frozen_stages=k).train()
        frozen = [model.stem] + list(model.stages[:k])
        for m in frozen:
            assert not m.training and all(not p.requires_grad for p in m.parameters())
        for m in model.stages[k:]:
            assert m.training and all(p.requires_grad for p in m.parameters())
        # stays so after a forward/backward in train mode
        sum(o.sum() for o in model(torch.randn(2, 3, 64, 64))).backward()
        assert all(p.grad is None for m in frozen for p in m.parameters())
        assert all(p.grad is not None for p in model.stages[k:].parameters())


def check_norm_eval(cls: type) -> None:
    """``norm_eval``: every BatchNorm in eval mode in training (statistics frozen), the
    rest trains; without it the statistics move. A family without BatchNorm builds one
    with ``norm_cfg=BN`` for the check."""
    kwargs = {}
    if not any(isinstance(m, _BatchNorm) for m in build(cls).modules()):
        kwargs = dict(norm_cfg=dict(type='BN'))
    x = torch.randn(2, 3, 64, 64)
    model = build(cls, norm_eval=True, **kwargs).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k}
    model(x)
    assert before and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(not m.training for m in model.modules() if isinstance(m, _BatchNorm))
    assert model.stages[-1].training
    model = build(cls, **kwargs).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if 'running_mean' in k}
    model(x)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def check_with_cp_equals_plain(model: torch.nn.Module, x: torch.Tensor, **forward_kwargs) -> None:
    """Activation checkpointing changes nothing: gradients, and the buffers a training
    step updates (BatchNorm running statistics take one step, not one per recomputation);
    and every parameter receives a gradient."""
    model.train()
    cp = copy.deepcopy(model)
    cp.with_cp = True
    assert all(stage.with_cp for stage in cp.stages)
    grads, buffers = [], []
    for m in (model, cp):
        outs = m(x, **forward_kwargs)
        sum(o.square().mean() for o in outs).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
        buffers.append(dict(m.named_buffers()))
    missing = [n for n, g in grads[0].items() if g is None or not g.abs().sum() > 0]
    assert missing == [], f'parameters without gradient: {missing[:5]}'
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)
    for n, b in buffers[0].items():
        torch.testing.assert_close(buffers[1][n], b, rtol=1e-5, atol=1e-6, msg=n)


def check_with_cp_recomputes(cls: type) -> None:
    """with_cp reaches the stem, every stage entry and every block; a frozen stem runs once
    (nothing to recompute for)."""
    def forward_counts(model):  # pre-hooks: the recomputation stops before forward hooks
        counts = dict(stem=0, entry=0, blocks=0)

        def count(name):
            return lambda *a: counts.__setitem__(name, counts[name] + 1)

        model.stem.register_forward_pre_hook(count('stem'))
        for stage in model.stages:
            stage.patch_embed.register_forward_pre_hook(count('entry'))
            for block in stage.blocks:
                block.register_forward_pre_hook(count('blocks'))
        outs = model.train()(torch.randn(1, 3, 64, 64))
        sum(o.sum() for o in outs).backward()
        return counts

    plain = forward_counts(build(cls))
    assert plain['stem'] == 1 and plain['blocks'] == sum(build(cls).arch_settings['depths'])
    entries = sum(not isinstance(s.patch_embed, torch.nn.Identity) for s in build(cls).stages)
    assert plain['entry'] == len(build(cls).stages)
    cp = forward_counts(build(cls, with_cp=True))
    # an Identity entry is never checkpointed: nothing to recompute
    assert cp == dict(stem=2, entry=plain['entry'] + entries, blocks=2 * plain['blocks'])
    assert forward_counts(build(cls, with_cp=True, frozen_stages=0))['stem'] == 1


# ----------------------------------------------------------------------------- layouts, paths
def check_channels_last_equals_nchw(model: torch.nn.Module, x: torch.Tensor,
                                    **forward_kwargs) -> None:
    """Conv weights are stored channels-last (and stay so through ``load_state_dict``),
    outputs come back as contiguous NCHW maps, and outputs (float32) and training gradients
    (float64) equal those of the same model with NCHW weights up to float rounding.

    The gradients are compared in float64: in float32 a value that the two layouts round to
    either side of an activation's kink (HSwish at +-3) takes the other derivative, which no
    tolerance of float rounding covers (GroupMixFormer: 44x the float32 tolerance on one
    seed of 60, where the others stayed within 0.8x; the test then failed on the random
    state the tests before it left)."""
    def conv_weights(m):
        return [c.weight for c in m.modules() if isinstance(c, torch.nn.Conv2d)]

    model.load_state_dict(copy.deepcopy(model).state_dict())
    assert conv_weights(model) and all(w.stride(1) == 1 for w in conv_weights(model))
    nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert all(w.is_contiguous() for w in conv_weights(nchw))
    outs = []
    for m in (model, nchw):
        with torch.no_grad():
            outs.append(m.eval()(x, **forward_kwargs))
    assert all(o.is_contiguous() for o in outs[0])
    for u, v in zip(*outs):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)
    model, nchw, x = model.double(), nchw.double(), x.double()
    assert all(w.stride(1) == 1 for w in conv_weights(model))  # still channels-last
    for m in (model, nchw):
        sum(o.square().mean() for o in m.train()(x, **forward_kwargs)).backward()
    for (n, p), q in zip(model.named_parameters(), nchw.parameters()):
        # rounding of the two layouts' kernels, relative to each gradient's scale
        atol = 1e-9 * (1 + q.grad.abs().max().item())
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=atol, msg=n)


def check_fused_equals_explicit(model: torch.nn.Module, x: torch.Tensor) -> None:
    """The fused (SDPA) and explicit attention paths give the same outputs (modules built
    with ``fused=None`` follow the process-wide default switched here)."""
    from mmhat.models.layers import set_fused_attn, use_fused_attn
    before = use_fused_attn()
    try:
        with torch.no_grad():
            set_fused_attn(True)
            fused = model(x)
            set_fused_attn(False)
            explicit = model(x)
    finally:
        set_fused_attn(before)
    for u, v in zip(fused, explicit):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- bad input
BAD_INPUTS = [
    ((3, 64, 64), r'expects a 4-D \(B, C, H, W\) tensor, got \(3, 64, 64\)'),
    ((1, 1, 3, 64, 64), r'4-D \(B, C, H, W\) tensor, got \(1, 1, 3, 64, 64\)'),
    ((1, 1, 64, 64), r'expects 3 input channels \(RGB\), got 1'),
    ((1, 4, 64, 64), r'expects 3 input channels \(RGB\), got 4'),
    ((1, 3, 16, 64), r'at least 32x32 pixels, got 16x64'),
    ((1, 3, 64, 31), r'at least 32x32 pixels, got 64x31'),
]

BAD_ARGUMENTS = [
    (dict(out_indices=(0, 4)), r'out_indices must be stage indices in \[0, 3\], got \(0, 4\)'),
    (dict(out_indices=(-1, )), r'out_indices must be stage indices in \[0, 3\], got \(-1,\)'),
    (dict(out_indices=()), r'out_indices must be stage indices in \[0, 3\], got \(\)'),
    (dict(out_indices=(2, 1)), 'out_indices must be increasing and unique'),
    (dict(frozen_stages=5), r'frozen_stages must be an int in \[-1, 4\]'),
    (dict(frozen_stages=-2), r'frozen_stages must be an int in \[-1, 4\]'),
    (dict(frozen_stages=1.5), r'frozen_stages must be an int in \[-1, 4\]'),
]


def check_bad_input(cls: type) -> None:
    model = build(cls).eval()
    for shape, match in BAD_INPUTS:
        with pytest.raises(ValueError, match=match):
            model(torch.randn(*shape))
    with pytest.raises(TypeError, match=r'takes no keyword arguments|unexpected keyword'):
        model(torch.randn(1, 3, 64, 64), img_metas=[{}])


def check_bad_arguments(cls: type) -> None:
    """Bad stage arguments, unknown arch, incomplete arch dict, arch keys given outside the
    dict, another backbone's arguments (a config merged without ``_delete_=True``)."""
    for kwargs, match in BAD_ARGUMENTS:
        with pytest.raises(ValueError, match=match):
            build(cls, **kwargs)
    names = "', '".join(cls.arch_zoo)
    with pytest.raises(ValueError, match=rf"unknown arch 'huge' .*valid names: '{names}'"):
        build(cls, arch='huge')
    arch = dict(cls.arch_zoo[cls.smallest_arch])
    del arch['depths']
    with pytest.raises(ValueError, match=r"arch dict is missing \['depths'\]"):
        build(cls, arch=arch)
    with pytest.raises(TypeError, match=r"\['depths'\] belong inside `arch`"):
        build(cls, depths=(1, 1, 1, 1))
    with pytest.raises(TypeError, match=r"arguments \['depth', 'style'\] of another backbone"
                       r".*Add _delete_=True"):
        build(cls, depth=50, style='pytorch')


# ----------------------------------------------------------------------------- checkpoints
def wrap_checkpoint(wrap: str, official: dict, native: dict) -> dict:
    """An official state_dict (and the same weights in mmhat format) in layout ``wrap``."""
    if wrap == 'model':
        return {'model': official}
    if wrap == 'model_with_args':  # what DeiT/PVT-style training scripts save
        return {'model': official, 'args': argparse.Namespace(lr=1e-3), 'epoch': 3}
    if wrap == 'state_dict':
        return {'state_dict': official, 'meta': {}}
    if wrap == 'module_prefix':
        return {'model': {f'module.{k}': v for k, v in official.items()}}
    if wrap == 'backbone_prefix':  # a whole detector: only the backbone is taken
        return {'state_dict': {**{f'backbone.{k}': v for k, v in native.items()},
                               'neck.conv.weight': torch.zeros(1)}}
    if wrap == 'mmhat_format':
        return dict(native)
    raise ValueError(wrap)


def check_checkpoint_wrapper(build_fn: Callable, official_path, wrap: str, tmp_path) -> None:
    """``build_fn(**kwargs)`` loads ``official_path`` wrapped as ``wrap`` to the same weights."""
    reference = build_fn(init_cfg=dict(type='Pretrained', checkpoint=str(official_path)))
    reference.init_weights()
    native = reference.state_dict()
    path = tmp_path / f'{wrap}.pth'
    torch.save(wrap_checkpoint(wrap, torch.load(official_path)['model'], native), path)
    model = build_fn(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    loaded = model.state_dict()
    assert loaded.keys() == native.keys()
    for k, v in native.items():
        assert torch.equal(loaded[k], v), k


def check_strict_checkpoint_errors(build_fn: Callable, official_path, tmp_path) -> None:
    """A missing file, a truncated file, an extra key and a missing key are errors that say
    what is wrong; nothing is loaded partially."""
    name = type(build_fn()).__name__
    model = build_fn(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'no.pth')))
    with pytest.raises(CheckpointError, match='checkpoint file not found: .*no.pth'):
        model.init_weights()
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(official_path.read_bytes()[:4096])
    model = build_fn(init_cfg=dict(type='Pretrained', checkpoint=str(cut)))
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        model.init_weights()
    official = torch.load(official_path)['model']
    extra = dict(official, **{'extra.weight': torch.zeros(3)})
    first = next(k for k in official if official[k].dim() > 1)
    for label, sd, match in [('extra', extra, r'1 unexpected keys: extra\.weight'),
                             ('missing', {k: v for k, v in official.items() if k != first},
                              r'1 missing keys: ')]:
        path = tmp_path / f'{label}.pth'
        torch.save({'model': sd}, path)
        model = build_fn(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(CheckpointError, match=rf'(?s)does not fit {name}:.*{match}.*'
                           rf'Is this a checkpoint of {name} arch='):
            model.init_weights()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
