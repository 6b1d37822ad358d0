"""Training computes the same gradients on every path: each family's parameter and input
gradients, on the default path (fused attention where the family has it, channels-last
weights) and the explicit one, with and without ``with_cp``, equal those of the faithful
reference path (explicit attention, NCHW weights as the official checkpoints store them, no
activation checkpointing) in float64 at 1e-7, from the reference case's official checkpoint
and input, in training mode. A speed-up of the training step that changed the math fails
here."""
import pytest
import torch

import backbone_contract as contract
import reference as R
from mmhat.models.layers import set_fused_attn, use_fused_attn

FAMILIES = [cls for cls in contract.families() if cls.reference_name]
#: (fused attention, channels-last weights, with_cp) of every path held to the reference
PATHS = [(fused, True, cp) for fused in (True, False) for cp in (False, True)]
REFERENCE_PATH = (False, False, False)
CASES = [(cls, path) for cls in FAMILIES for path in PATHS
         if cls.fused_attention or not path[0]]


def _grads(cls, checkpoint, fused: bool, channels_last: bool, with_cp: bool):
    case = R.load_case(f'{cls.reference_name}-{cls.smallest_arch}')
    model = contract.build(cls, init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint)),
                           channels_last=channels_last, with_cp=with_cp)
    model.init_weights()
    model.double().train()
    x = case['input'].double().requires_grad_(True)
    before = use_fused_attn()
    try:
        set_fused_attn(fused)
        outs = model(x)
    finally:
        set_fused_attn(before)
    # a loss that weighs every element of every stage differently (fixed seed)
    gen = torch.Generator().manual_seed(0)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads['<input>'] = x.grad.clone()
    return grads, sum(1 for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpt')
    return {cls: R.write_official_checkpoint(f'{cls.reference_name}-{cls.smallest_arch}',
                                             root / f'{cls.__name__}.pth') for cls in FAMILIES}


@pytest.fixture(scope='module')
def reference_grads(official):
    return {cls: _grads(cls, official[cls], *REFERENCE_PATH) for cls in FAMILIES}


@pytest.mark.parametrize('cls,path', CASES, ids=[
    f'{c.__name__}-{"fused" if f else "explicit"}-{"cl" if cl else "nchw"}'
    f'{"-with_cp" if cp else ""}' for c, (f, cl, cp) in CASES])
def test_gradients_equal_the_reference_path_in_float64(cls, path, official, reference_grads):
    ref, n_params = reference_grads[cls]
    assert len(ref) == n_params + 1, 'every parameter gets a gradient on the reference path'
    got, _ = _grads(cls, official[cls], *path)
    assert got.keys() == ref.keys()
    # A bias right before a training-mode BatchNorm has a gradient that is zero in exact
    # arithmetic (the norm subtracts the mean): its rounding noise is held to the largest
    # gradient's scale instead (1e-6 of it, so 1e-13 absolute), every other one to its own.
    floor = 1e-6 * max(g.abs().max().item() for g in ref.values())
    worst = {}
    for name, g_ref in ref.items():
        g = got[name].contiguous()
        scale = max(g_ref.abs().max().item(), floor)
        worst[name] = (g - g_ref).abs().max().item() / scale
    bad = {k: v for k, v in worst.items() if v > R.FLOAT64_REL}
    assert not bad, f'{len(bad)} gradients differ beyond 1e-7 relative: ' + ', '.join(
        f'{k}: {v:.1e}' for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:5])
