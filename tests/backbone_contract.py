"""Checks every mmhat backbone must pass, written once and called by each family's tests."""
import argparse
import copy
from typing import Callable

import torch

#: the checkpoint layouts a backbone must load (see mmhat.checkpoint.extract_state_dict)
WRAPS = ['model', 'model_with_args', 'state_dict', 'module_prefix', 'backbone_prefix',
         'mmhat_format']


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


def check_checkpoint_wrapper(build: Callable, official_path, wrap: str, tmp_path) -> None:
    """``build(**kwargs)`` loads ``official_path`` wrapped as ``wrap`` to the same weights."""
    reference = build(init_cfg=dict(type='Pretrained', checkpoint=str(official_path)))
    reference.init_weights()
    native = reference.state_dict()
    path = tmp_path / f'{wrap}.pth'
    torch.save(wrap_checkpoint(wrap, torch.load(official_path)['model'], native), path)
    model = build(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    loaded = model.state_dict()
    assert loaded.keys() == native.keys()
    for k, v in native.items():
        assert torch.equal(loaded[k], v), k


def check_with_cp_equals_plain(model: torch.nn.Module, x: torch.Tensor, **forward_kwargs) -> None:
    """Activation checkpointing changes nothing: gradients, and the buffers a training
    step updates (BatchNorm running statistics take one step, not one per recomputation);
    and every parameter receives a gradient."""
    model.train()
    cp = copy.deepcopy(model)
    cp.with_cp = True
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


def check_channels_last_equals_nchw(model: torch.nn.Module, x: torch.Tensor,
                                    **forward_kwargs) -> None:
    """Conv weights are stored channels-last (and stay so through ``load_state_dict``),
    outputs come back as contiguous NCHW maps, and outputs and training gradients equal
    those of the same model with NCHW weights up to float rounding."""
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
    # contiguous NCHW outputs: mmcv's RoIAlign ignores strides (see output_map)
    assert all(o.is_contiguous() for o in outs[0])
    for u, v in zip(*outs):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)
    for m in (model, nchw):
        sum(o.square().mean() for o in m.train()(x, **forward_kwargs)).backward()
    for (n, p), q in zip(model.named_parameters(), nchw.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=n)
