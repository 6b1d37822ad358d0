"""The shared attention kernel and layout helpers."""
import warnings

import pytest
import torch

from mmhat.models.layers import (attention, crop, nchw_to_nlc, nlc_to_nchw, pad_amounts,
                                 pad_bottom_right, set_fused_attn, use_fused_attn,
                                 window_partition, window_reverse)


@pytest.mark.parametrize('with_mask', [False, True])
def test_fused_and_explicit_attention_agree(with_mask):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 7, 8), torch.randn(2, 3, 5, 11, 8), torch.randn(2, 3, 5, 11, 6)
    mask = torch.rand(1, 1, 5, 1, 11) > 0.3 if with_mask else None
    if mask is not None:
        mask[..., 0] = True
    scale = 0.37  # not d ** -0.5: both paths must use the scale given
    a = attention(q, k, v, scale, mask, fused=True)
    b = attention(q, k, v, scale, mask, fused=False)
    assert a.shape == (2, 3, 5, 7, 6)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    logits = torch.einsum('...qd,...kd->...qk', q, k) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float('-inf'))
    torch.testing.assert_close(b, logits.softmax(-1) @ v, rtol=1e-5, atol=1e-6)


def test_masked_keys_get_no_weight():
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    mask = torch.tensor([[True, True, True, False, False, False]])  # (N_q=1 broadcast, N_k)
    changed = v.clone()
    changed[..., 3:, :] = 1e6
    for fused in (True, False):
        torch.testing.assert_close(attention(q, k, v, 1.0, mask, fused),
                                   attention(q, k, changed, 1.0, mask, fused))


def test_fused_path_never_falls_back_to_the_math_kernel():
    """Head-split views of NCHW maps have stride N along d; SDPA would then run its math
    backend (the full N_q x N_k matrix). The kernel must hand it unit-stride operands."""
    from torch.profiler import profile
    torch.manual_seed(0)
    maps = torch.randn(1, 2 * 16, 24, 20)  # (B, h*d, H, W) as HAT-Net's 1x1 convs give
    q = maps.view(1, 2, 16, 480).transpose(-2, -1)  # (B, h, N, d), stride(-1) == N
    kv = maps[..., ::4, ::4].reshape(1, 2, 16, 30).transpose(-2, -1)
    assert q.stride(-1) != 1
    with profile() as prof:
        out = attention(q, kv, kv, 0.25, fused=True)
    kernels = {e.key for e in prof.key_averages()}
    assert 'aten::_scaled_dot_product_attention_math' not in kernels, kernels
    torch.testing.assert_close(out, attention(q, kv, kv, 0.25, fused=False), rtol=1e-5,
                               atol=1e-6)


def test_global_default_and_module_override():
    try:
        set_fused_attn(False)
        assert use_fused_attn() is False and use_fused_attn(True) is True
        set_fused_attn(True)
        assert use_fused_attn() is True and use_fused_attn(False) is False
    finally:
        set_fused_attn(True)


def test_layout_round_trips():
    x = torch.randn(2, 5, 12, 8)
    tokens = nchw_to_nlc(x)
    assert tokens.shape == (2, 96, 5)
    assert torch.equal(tokens[0, 8 * 3 + 2], x[0, :, 3, 2])  # row-major token order
    assert torch.equal(nlc_to_nchw(tokens, (12, 8)), x)
    cells = window_partition(x, 4)
    assert cells.shape == (2, 3, 2, 16, 5)
    assert torch.equal(cells[1, 2, 1, 4 * 1 + 3], x[1, :, 8 + 1, 4 + 3])  # cell (2,1), (gy,gx)=(1,3)
    assert torch.equal(window_reverse(cells, 4), x)
    with pytest.raises(ValueError, match='cannot form a 5x5 map'):
        nlc_to_nchw(tokens, (5, 5))


def test_pad_and_crop():
    assert pad_amounts((33, 47), 8) == (7, 1)
    assert pad_amounts((32, 48), 8) == (0, 0)
    x = torch.randn(1, 2, 5, 6)
    assert pad_bottom_right(x, 0, 0) is x
    padded = pad_bottom_right(x, 3, 2)
    assert padded.shape == (1, 2, 8, 8) and padded[..., 5:, :].abs().sum() == 0
    assert torch.equal(crop(padded, (5, 6)), x)
    assert crop(x, (5, 6)) is x


# ---------------------------------------------------------------------------------------
# Convolutions with CPU training kernels (layers/conv.py)
# ---------------------------------------------------------------------------------------
def _conv_case(module, x):
    """Output and gradients (input, weight, bias) of ``module`` and of ``F.conv2d`` with its
    parameters, in float64, for a loss weighing every output element differently."""
    x = x.double().requires_grad_(True)
    module = module.double()
    y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    got = [y] + list(torch.autograd.grad((y * g).sum(), [x] + list(module.parameters())))
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    xr = x.detach().contiguous().requires_grad_(True)
    yr = torch.nn.functional.conv2d(xr, params[0], params[1] if len(params) > 1 else None,
                                    padding=module.padding, groups=module.groups)
    want = [yr] + list(torch.autograd.grad((yr * g).sum(), [xr] + params))
    return got, want


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('batch,hw', [(1, (7, 5)), (2, (1, 9)), (3, (4, 4))])
def test_pointwise_conv_equals_conv2d(batch, hw, bias):
    from mmhat.models.layers import PointwiseConv2d
    torch.manual_seed(0)
    conv = PointwiseConv2d(6, 10, bias=bias).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 6, *hw).contiguous(memory_format=torch.channels_last)
    got, want = _conv_case(conv, x)
    assert got[0].shape == (batch, 10, *hw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('kernel', [3, 5, 7, 9])
@pytest.mark.parametrize('batch,hw', [(1, (9, 6)), (2, (5, 11)), (3, (1, 1)), (2, (2, 13))])
def test_depthwise_conv_equals_conv2d(kernel, batch, hw):
    from mmhat.models.layers import DepthwiseConv2d
    torch.manual_seed(0)
    conv = DepthwiseConv2d(8, kernel).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 8, *hw).contiguous(memory_format=torch.channels_last)
    got, want = _conv_case(conv, x)
    assert got[0].shape == (batch, 8, *hw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_conv_kernels_take_their_path_only_where_they_apply(monkeypatch):
    """The CPU kernels run on channels-last CPU maps in eager mode when a gradient is
    recorded; NCHW maps, inference, tracing (FLOP counters, ONNX) and
    ``set_cpu_kernels(False)`` get ``nn.Conv2d.forward``."""
    from mmhat.models.layers import (DepthwiseConv2d, PointwiseConv2d, set_cpu_kernels,
                                     use_cpu_kernels)
    from mmhat.models.layers import conv as conv_module
    calls = []
    monkeypatch.setattr(torch.nn.Conv2d, 'forward',
                        lambda self, x: calls.append(type(self).__name__) or
                        self._conv_forward(x, self.weight, self.bias))
    pw = PointwiseConv2d(4, 4)
    dw = DepthwiseConv2d(4, 5)
    cl = torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    nchw = torch.randn(1, 4, 6, 6)
    assert use_cpu_kernels()
    pw(cl), dw(cl)
    assert calls == []
    pw(nchw), dw(nchw)
    assert calls == ['PointwiseConv2d', 'DepthwiseConv2d']
    calls.clear()
    with torch.no_grad():
        pw(cl), dw(cl)  # inference: plain conv (no weight gradient to compute)
    assert calls == ['PointwiseConv2d', 'DepthwiseConv2d']
    calls.clear()
    graph = torch.jit.trace(torch.nn.Sequential(pw, dw), cl).inlined_graph
    assert 'aten::linear' not in str(graph) and str(graph).count('aten::_convolution') == 2
    calls.clear()
    try:
        set_cpu_kernels(False)
        assert not use_cpu_kernels()
        pw(cl), dw(cl)
    finally:
        set_cpu_kernels(True)
    assert calls == ['PointwiseConv2d', 'DepthwiseConv2d']
    assert conv_module.SLOW_DEPTHWISE_WGRAD_KERNEL == 5
    calls.clear()
    DepthwiseConv2d(4, 3)(cl.requires_grad_())  # 3x3: oneDNN's channels-last is the fast one
    assert calls == ['DepthwiseConv2d']


def _conv3x3_weight_grads(fn):
    """How many 3x3 / other weight gradients ``fn`` computes, and whether the native
    per-channel kernel ran."""
    from torch.profiler import profile
    with profile(record_shapes=True) as prof:
        fn()
    grads = [e.input_shapes[2] for e in prof.events()
             if e.name == 'aten::convolution_backward']
    native = any(e.name == 'aten::_slow_conv2d_backward' for e in prof.events())
    return [tuple(s[-2:]) for s in grads], native


@pytest.mark.parametrize('kernel,blocks', [(5, 4), (7, 9), (9, 16)])
def test_depthwise_weight_gradient_is_assembled_from_3x3_blocks(kernel, blocks):
    """Odd k >= 5: the weight gradient is ``ceil((k - 1) / 2)^2`` 3x3 ones (oneDNN's fast
    kernel), besides the input gradient's k x k one, and no native per-channel kernel; the
    borders of the reused input frame are zeroed whatever the buffer held before."""
    from mmhat.models.layers import DepthwiseConv2d
    from mmhat.models.layers.conv import scratch
    conv = DepthwiseConv2d(8, kernel, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 12, 10).contiguous(memory_format=torch.channels_last)
    scratch(10 ** 5, torch.float32, x.device).fill_(float('nan'))
    shapes, native = _conv3x3_weight_grads(
        lambda: conv(x.requires_grad_()).square().sum().backward())
    assert sorted(shapes) == [(3, 3)] * blocks + [(kernel, kernel)] and not native
    want = torch.ops.aten.convolution_backward(
        2 * conv(x).detach(), x.detach(), conv.weight.detach(), None, [1, 1],
        [kernel // 2] * 2, [1, 1], False, [0, 0], 8, [False, True, False])[1]
    torch.testing.assert_close(conv.weight.grad, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('hw', [(200, 304), (50, 76)])
def test_depthwise_weight_gradient_in_blocks_float32_at_stage_sizes(hw):
    """float32 at TransCNN-T's stage-1 / stage-3 map sizes, against a float64 reference:
    sums of 60800 products per entry at float32 rounding (the blocks: 4.6e-6 of the largest
    entry at 200x304; oneDNN's own 5x5 kernel: 1.1e-6)."""
    from mmhat.models.layers import DepthwiseConv2d
    torch.manual_seed(0)
    conv = DepthwiseConv2d(16, 5, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(1, 16, *hw).contiguous(memory_format=torch.channels_last)
    g = torch.randn(1, 16, *hw).contiguous(memory_format=torch.channels_last)
    (got,) = torch.autograd.grad(conv(x.requires_grad_()), [conv.weight], g)
    want = torch.ops.aten.convolution_backward(
        g.double(), x.detach().double(), conv.weight.detach().double(), None, [1, 1], [2, 2],
        [1, 1], False, [0, 0], 16, [False, True, False])[1]
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_depthwise_weight_gradient_in_blocks_only_where_it_applies():
    """Even kernels, strides, dilations or other paddings keep ``nn.Conv2d``'s backward;
    an input frame given where no block weight gradient reads it is refused."""
    from mmhat.models.layers import DepthwiseConv2d, set_cpu_kernels
    assert DepthwiseConv2d(4, 5).weight_grad_in_blocks()
    assert not DepthwiseConv2d(4, 3).weight_grad_in_blocks()
    assert not DepthwiseConv2d(4, 6).weight_grad_in_blocks()
    for attr, value in (('stride', (2, 2)), ('dilation', (2, 2)), ('padding', (1, 1))):
        conv = DepthwiseConv2d(4, 5)
        setattr(conv, attr, value)
        assert not conv.weight_grad_in_blocks()
        conv = conv.double().to(memory_format=torch.channels_last)
        x = torch.randn(1, 4, 9, 8, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        y = conv(x)
        got = torch.autograd.grad(y.square().sum(), [x, conv.weight])
        want = torch.autograd.grad(torch.nn.Conv2d.forward(conv, x.contiguous()).square().sum(),
                                   [x, conv.weight])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    try:
        set_cpu_kernels(False)
        assert not DepthwiseConv2d(4, 5).weight_grad_in_blocks()
    finally:
        set_cpu_kernels(True)
    conv = DepthwiseConv2d(4, 3)
    x = torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match='x_frame'):
        conv.gradients(x, x, (True, True, True), x_frame=x.flatten())
    with pytest.raises(ValueError, match='x_frame'):
        DepthwiseConv2d(4, 5).gradients(x, x, (True, False, True), x_frame=x.flatten())
    with pytest.raises(ValueError, match='make it with input_frame'):
        DepthwiseConv2d(4, 5).gradients(x, x, (True, True, True), x_frame=x.flatten())


@pytest.mark.parametrize('kernel', [5, 7])
@pytest.mark.parametrize('bias', [True, False])
def test_depthwise_conv2d_equals_conv2d(kernel, bias):
    """``depthwise_conv2d`` with a kernel that is no leaf (a repeated one, as
    GroupMixFormer's proxies use): values and every gradient of ``F.conv2d`` in float64, its
    weight gradient from 3x3 blocks; at odd sizes, batch 2."""
    from mmhat.models.layers import depthwise_conv2d
    torch.manual_seed(0)
    base = torch.randn(3, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True) if bias else None
    x0 = torch.randn(2, 9, 7, 11, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    g = torch.randn(2, 9, 7, 11, dtype=torch.float64)
    results = []
    for fn in (lambda x, w: depthwise_conv2d(x, w, b),
               lambda x, w: torch.nn.functional.conv2d(x, w, b, padding=kernel // 2, groups=9)):
        x = x0.clone().requires_grad_()
        y = fn(x, base.repeat(3, 1, 1, 1))
        results.append([y] + list(torch.autograd.grad((y * g).sum(), [x, base] + [b] * bias)))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    # float32 (oneDNN's kernels; float64 runs the native ones): 3x3 blocks only
    w32 = base.detach().float().requires_grad_()
    shapes, native = _conv3x3_weight_grads(
        lambda: depthwise_conv2d(x0.float(), w32.repeat(3, 1, 1, 1)).sum().backward())
    assert shapes.count((3, 3)) == (4 if kernel == 5 else 9) and not native


def test_depthwise_conv2d_is_conv2d_where_blocks_do_not_apply():
    """3x3 kernels, NCHW maps, a weight without a gradient, the kernels off, tracing: plain
    ``F.conv2d`` (no 3x3 blocks); a kernel that does not fit gets ``F.conv2d``'s error."""
    from mmhat.models.layers import depthwise_conv2d, set_cpu_kernels
    w5 = torch.randn(4, 1, 5, 5, requires_grad=True)
    cl = torch.randn(1, 4, 6, 7).contiguous(memory_format=torch.channels_last)
    cases = [(cl, torch.randn(4, 1, 3, 3, requires_grad=True)), (cl.contiguous(), w5),
             (cl, w5.detach())]
    for x, w in cases:
        shapes, _ = _conv3x3_weight_grads(lambda: depthwise_conv2d(
            x.requires_grad_(), w).sum().backward())
        assert (3, 3) not in shapes or w.shape[-1] == 3
        assert shapes.count((3, 3)) <= 1
    try:
        set_cpu_kernels(False)
        shapes, _ = _conv3x3_weight_grads(lambda: depthwise_conv2d(cl, w5).sum().backward())
        assert shapes == [(5, 5)]
    finally:
        set_cpu_kernels(True)
    cl, w = cl.detach(), w5.detach()
    traced = torch.jit.trace(lambda x: depthwise_conv2d(x, w, kernel_size=5), cl)
    assert '_convolution' in str(traced.inlined_graph)
    torch.testing.assert_close(traced(cl), torch.nn.functional.conv2d(cl, w, padding=2, groups=4))
    with pytest.raises(RuntimeError, match='expected weight|to have 4 channels|groups'):
        depthwise_conv2d(cl, torch.randn(3, 1, 5, 5, requires_grad=True))


def test_conv_kernels_keep_the_conv2d_state_dict():
    from mmhat.models.layers import DepthwiseConv2d, PointwiseConv2d
    pw, ref = PointwiseConv2d(3, 5, bias=False), torch.nn.Conv2d(3, 5, 1, bias=False)
    assert {k: v.shape for k, v in pw.state_dict().items()} == \
        {k: v.shape for k, v in ref.state_dict().items()}
    dw, ref = DepthwiseConv2d(6, 5), torch.nn.Conv2d(6, 6, 5, padding=2, groups=6)
    assert {k: v.shape for k, v in dw.state_dict().items()} == \
        {k: v.shape for k, v in ref.state_dict().items()}
    assert isinstance(pw, torch.nn.Conv2d) and isinstance(dw, torch.nn.Conv2d)


def test_cpu_kernels_off_by_environment():
    import subprocess
    import sys
    code = 'from mmhat.models.layers import use_cpu_kernels; print(use_cpu_kernels())'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         env={**__import__('os').environ, 'MMHAT_CPU_KERNELS': '0'}, check=True)
    assert out.stdout.strip() == 'False'


@pytest.mark.parametrize('conv_kind', ['pointwise', 'depthwise3', 'depthwise5'])
@pytest.mark.parametrize('input_grad', [True, False])
@pytest.mark.parametrize('conv_kernels', [True, False])
@pytest.mark.parametrize('act', [torch.nn.SiLU(), torch.nn.GELU(approximate='tanh'),
                                 torch.nn.Hardswish()], ids=['silu', 'gelu-tanh', 'hardswish'])
def test_act_then_conv_equals_conv_of_act_and_keeps_only_the_input(conv_kind, input_grad,
                                                                   conv_kernels, act,
                                                                   monkeypatch):
    """``act_then_conv``: the gradients of ``conv(act(x))`` in float64, with one tensor kept
    for the backward (the input) where autograd keeps the activation too; with the conv
    kernels on or off (then the convolution's backward is ``nn.Conv2d``'s), for activations
    whose input gradient it writes itself (SiLU, GELU) and others (autograd)."""
    from mmhat.models.layers import DepthwiseConv2d, PointwiseConv2d, act_then_conv
    from mmhat.models.layers import conv as conv_module
    monkeypatch.setattr(conv_module, '_ENABLED', conv_kernels)
    torch.manual_seed(0)
    conv = (PointwiseConv2d(6, 5) if conv_kind == 'pointwise' else
            DepthwiseConv2d(6, int(conv_kind[-1])))
    conv = conv.double().to(memory_format=torch.channels_last)
    x0 = torch.randn(2, 6, 7, 9, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    g = torch.randn(2, 5 if conv_kind == 'pointwise' else 6, 7, 9, dtype=torch.float64)

    def run(fn):
        x = x0.clone().requires_grad_(input_grad)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t,
                                                      lambda t: t):
            y = fn(x)
        wanted = ([x] if input_grad else []) + list(conv.parameters())
        return [y] + list(torch.autograd.grad((y * g).sum(), wanted)), kept

    got, kept = run(lambda x: act_then_conv(act, conv, x))
    want, autograd_kept = run(lambda x: torch.nn.functional.conv2d(
        act(x), conv.weight, conv.bias, padding=conv.padding, groups=conv.groups))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert kept == [x0.shape]
    assert autograd_kept.count(x0.shape) == (2 if input_grad else 1)  # x and act(x)


def test_scratch_like_reuses_one_buffer_per_thread():
    import threading

    from mmhat.models.layers.conv import scratch_like
    cl = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    a = scratch_like(cl)
    assert a.shape == cl.shape and a.stride() == cl.stride() and a.dtype == cl.dtype
    b = scratch_like(torch.randn(3, 4, 5))  # smaller: the same memory
    assert b.data_ptr() == a.data_ptr() and b.stride() == (20, 5, 1)
    big = scratch_like(torch.randn(4, 6, 5, 7))  # larger: a new buffer
    assert big.shape == (4, 6, 5, 7) and scratch_like(cl).data_ptr() == big.data_ptr()
    assert scratch_like(cl.double()).dtype == torch.float64
    other = []
    thread = threading.Thread(target=lambda: other.append(scratch_like(cl).data_ptr()))
    thread.start()
    thread.join()
    assert other[0] != scratch_like(cl).data_ptr()
    with pytest.raises(ValueError, match='contiguous'):
        scratch_like(torch.randn(4, 6).t())


def test_act_then_conv_falls_back_where_it_does_not_apply():
    """An in-place activation, NCHW maps, no gradient, or ``set_act_recompute(False)``:
    plain ``conv(act(x))`` (what autograd records is then the activation's own node)."""
    from mmhat.models.layers import PointwiseConv2d, act_then_conv, set_act_recompute
    conv = PointwiseConv2d(4, 4).to(memory_format=torch.channels_last)
    cl = torch.randn(1, 4, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()

    def node(y):
        return type(y.grad_fn).__name__

    assert node(act_then_conv(torch.nn.SiLU(), conv, cl)) == '_ActThenConvBackward'
    assert '_ActThenConvBackward' != node(act_then_conv(torch.nn.SiLU(), conv,
                                                     cl.detach().contiguous().requires_grad_()))
    inplace = act_then_conv(torch.nn.SiLU(inplace=True), conv, cl.clone())
    assert node(inplace) != '_ActThenConvBackward'
    try:
        set_act_recompute(False)
        assert node(act_then_conv(torch.nn.SiLU(), conv, cl)) != '_ActThenConvBackward'
    finally:
        set_act_recompute(True)
    with torch.no_grad():
        assert act_then_conv(torch.nn.SiLU(), conv, cl).grad_fn is None


def test_conv_kernels_train_under_cpu_autocast():
    """bfloat16 autocast (``tools/train.py --amp`` on the CPU): the kernels with their own
    backward step aside, and the gradients are those of plain ``nn.Conv2d``."""
    from mmhat import compat
    from mmhat.models.layers import DepthwiseConv2d, PointwiseConv2d, act_then_conv
    if not compat.autocast_supports('cpu', torch.bfloat16):
        pytest.skip('no bfloat16 autocast on this CPU torch')
    torch.manual_seed(0)
    pw = PointwiseConv2d(8, 8).to(memory_format=torch.channels_last)
    dw = DepthwiseConv2d(8, 5).to(memory_format=torch.channels_last)
    x = torch.randn(1, 8, 6, 7).contiguous(memory_format=torch.channels_last).requires_grad_()

    def grads(kernels: bool):
        from mmhat.models.layers import set_cpu_kernels
        set_cpu_kernels(kernels)
        try:
            with torch.autocast('cpu', dtype=torch.bfloat16):
                y = act_then_conv(torch.nn.SiLU(), pw, dw(x))
            return torch.autograd.grad(y.float().sum(), [x, pw.weight, dw.weight])
        finally:
            set_cpu_kernels(True)

    for a, b in zip(grads(True), grads(False)):
        assert a.dtype == b.dtype and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('value,want', [('', True), ('1', True), ('ON', True), ('yes', True),
                                        ('0', False), ('False', False), (' off ', False),
                                        ('no', False)])
def test_env_switch_values(monkeypatch, value, want):
    from mmhat.models.layers.switches import env_switch
    monkeypatch.setenv('MMHAT_TEST_SWITCH', value)
    assert env_switch('MMHAT_TEST_SWITCH') is want


def test_env_switch_refuses_a_typo(monkeypatch):
    """A misspelt value is an error naming the variable, not a switch silently left on."""
    import subprocess
    import sys
    from mmhat.models.layers.switches import env_switch
    monkeypatch.setenv('MMHAT_TEST_SWITCH', 'of')
    with pytest.raises(ValueError, match=r"MMHAT_TEST_SWITCH='of': set it to one of 0, false"):
        env_switch('MMHAT_TEST_SWITCH')
    out = subprocess.run([sys.executable, '-c', 'import mmhat.models'], capture_output=True,
                         text=True, env={**__import__('os').environ, 'MMHAT_FUSED_ATTN': 'flase'})
    assert out.returncode != 0 and "MMHAT_FUSED_ATTN='flase'" in out.stderr


# ----------------------------------------------------------------------------- drop path
def test_drop_path_equals_mmcv_and_keeps_its_mask_off_the_saved_tensors():
    """mmhat's DropPath draws, outputs and differentiates as mmcv's, bit for bit; under
    activation checkpointing the recomputation stops before the branch's last linear layer
    (mmcv's saves its mask after it, so that layer is multiplied again)."""
    from mmcv.cnn.bricks import DropPath as MMCVDropPath
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import checkpoint
    from mmhat.models.layers.drop import DropPath, drop_path
    assert isinstance(drop_path(0.0), torch.nn.Identity)
    assert isinstance(drop_path(0.3), DropPath) and drop_path(0.3).drop_prob == 0.3
    x = torch.randn(8, 5, 7, dtype=torch.float64)
    outs = []
    for cls in (MMCVDropPath, DropPath):
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        y = cls(0.5)(xi)
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert (outs[1][0] == 0).flatten(1).all(dim=1).any()  # some samples dropped at 0.5
    assert torch.equal(DropPath(0.5).eval()(x), x)
    with torch.no_grad():
        torch.manual_seed(3)
        assert torch.equal(DropPath(0.5)(x), outs[1][0])

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten.addmm.default
            return func(*args, **(kwargs or {}))

    fc1, fc2 = torch.nn.Linear(7, 16), torch.nn.Linear(16, 7)
    recomputed = {}
    for cls in (MMCVDropPath, DropPath):
        dp = cls(0.5)
        xi = x.float().requires_grad_()
        y = checkpoint(lambda t: t + dp(fc2(torch.relu(fc1(t)))), xi, use_reentrant=False)
        mode = Products()
        with mode:
            y.sum().backward()
        recomputed[cls] = mode.count
    assert recomputed == {MMCVDropPath: 2, DropPath: 1}  # fc1 and fc2 / fc1 only


# ---------------------------------------------------------------------------------------
# Windows in one copy each way (layout.window_qkv / merge_windows)
# ---------------------------------------------------------------------------------------
def _views_path(qkv, window, pad, heads):
    """What window_attention did before: pad, cut by views and reshapes, split."""
    B, C3, H, W = qkv.shape
    padded = pad_bottom_right(qkv, *pad)  # (B, 3C, Hp, Wp)
    cells = window_partition(padded, window)  # (B, nH, nW, G*G, 3C)
    cells = cells.reshape(-1, window * window, 3, heads, C3 // (3 * heads))  # (B', G*G, 3, h, d)
    return cells.permute(2, 0, 3, 1, 4).unbind(0)  # each (B', h, G*G, d)


# (batch, heads, head width, H, W, window, padding beyond the minimum, channels-last):
# whole and partial cells, a map smaller than one cell, cells of padding only, NCHW
WINDOW_CASES = [(2, 2, 3, 13, 11, 4, 0, True), (1, 1, 5, 16, 8, 8, 0, True),
                (2, 3, 2, 9, 14, 7, 7, False), (1, 2, 4, 7, 7, 7, 0, True),
                (1, 1, 2, 3, 5, 4, 4, True)]


@pytest.mark.parametrize('B,h,d,H,W,G,extra,channels_last', WINDOW_CASES)
def test_window_qkv_and_merge_equal_the_views_path(B, h, d, H, W, G, extra, channels_last):
    """Values and gradients equal (they are copies: bit for bit) to pad + window_partition +
    split and to window_reverse + crop; the cells are zero over padding, the gradient of a
    merged map is zero there, and the merged map has the memory format asked for."""
    from mmhat.models.layers import merge_windows, window_qkv
    gen = torch.Generator().manual_seed(0)
    pad = (pad_amounts((H, W), G)[0] + extra, pad_amounts((H, W), G)[1])
    qkv = torch.randn(B, 3 * h * d, H, W, dtype=torch.float64, generator=gen)
    if channels_last:
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    grads = [torch.randn(B * ((H + pad[0]) // G) * ((W + pad[1]) // G), h, G * G, d,
                         dtype=torch.float64, generator=gen) for _ in range(3)]
    got, want = [], []
    for cut, out in ((window_qkv, got), (_views_path, want)):
        x = qkv.detach().clone().requires_grad_()
        parts = cut(x, G, pad, h)
        out += [p.detach() for p in parts]
        out += torch.autograd.grad(parts, x, grads)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got[3].is_contiguous(memory_format=torch.channels_last) == channels_last

    nH, nW = (H + pad[0]) // G, (W + pad[1]) // G
    cells = grads[0].clone().requires_grad_()
    merged = merge_windows(cells, (B, nH, nW), (H, W))
    ref = cells.detach().transpose(1, 2).reshape(B, nH, nW, G * G, h * d)
    assert torch.equal(merged, crop(window_reverse(ref, G), (H, W)))
    assert merged.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn(merged.shape, dtype=torch.float64, generator=gen)
    (grad_cells,) = torch.autograd.grad(merged, cells, g)
    ref_cells = cells.detach().clone().requires_grad_()
    ref_map = crop(window_reverse(ref_cells.transpose(1, 2).reshape(B, nH, nW, G * G, h * d),
                                  G), (H, W))
    assert torch.equal(grad_cells, torch.autograd.grad(ref_map, ref_cells, g)[0])  # 0: padding
    assert merge_windows(cells.detach(), (B, nH, nW), (H, W), torch.contiguous_format
                         ).is_contiguous()


def test_window_attention_cuts_in_one_copy_and_falls_back_where_autograd_functions_cannot():
    """window_attention's default: no pad, stack or reshape copies in forward + backward, the
    same values and gradients as the views path (set_window_copies(False)), which tracing
    (FLOP counters, ONNX) always takes."""
    from torch.profiler import profile

    from mmhat.models.layers import set_window_copies, use_window_copies, window_attention
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 3 * 8, 13, 18, dtype=torch.float64, generator=gen)
    qkv = qkv.contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 8, 13, 18, dtype=torch.float64, generator=gen)
    results, ops = [], []
    assert use_window_copies()
    for one_copy in (True, False):
        for fused in (True, False):
            set_window_copies(one_copy)
            try:
                x = qkv.detach().clone().requires_grad_()
                with profile() as prof:
                    out = window_attention(x, 4, 2, 0.5, pad_amounts((13, 18), 4), fused)
                    (gx,) = torch.autograd.grad(out, x, g)
            finally:
                set_window_copies(True)
            results.append((out, gx))
            ops.append({e.key for e in prof.key_averages()})
    for out, gx in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx, results[0][1], rtol=1e-12, atol=1e-12)
    views_only = {'aten::constant_pad_nd', 'aten::stack'}
    assert not views_only & (ops[0] | ops[1]) and views_only <= ops[2] and views_only <= ops[3]
    with warnings.catch_warnings():  # crop's size test, constant for this trace
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        graph = str(torch.jit.trace(lambda t: window_attention(t, 4, 2, 0.5, (3, 2)),
                                    qkv.float()).inlined_graph)
    assert 'PythonOp' not in graph and 'aten::pad' in graph and 'aten::unbind' in graph


def test_window_qkv_and_merge_refuse_a_grid_that_does_not_fit():
    from mmhat.models.layers import merge_windows, window_qkv
    with pytest.raises(ValueError, match='does not divide into 4x4 cells; pass at least'):
        window_qkv(torch.randn(1, 6, 9, 8), 4, (2, 0), 1)
    with pytest.raises(ValueError, match='do not form a grid'):
        merge_windows(torch.randn(6, 1, 16, 2), (1, 2, 2), (8, 8))  # 6 cells, not 4
    with pytest.raises(ValueError, match='covering 9x8'):
        merge_windows(torch.randn(4, 1, 16, 2), (1, 2, 2), (9, 8))


def test_window_copies_off_by_environment():
    import subprocess
    import sys
    code = 'from mmhat.models.layers import use_window_copies; print(use_window_copies())'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         env={**__import__('os').environ, 'MMHAT_WINDOW_COPIES': '0'}, check=True)
    assert out.stdout.strip() == 'False'


def _batchnorm(channels: int, dtype: torch.dtype, **kwargs) -> torch.nn.BatchNorm2d:
    norm = torch.nn.BatchNorm2d(channels, **kwargs).to(dtype)
    if norm.affine:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    return norm


def _folded_and_plain(conv, norm, x0, g, steps=1):
    """``pointwise_then_norm`` on copies of ``conv`` and ``norm``, ``steps`` forwards and a
    backward of ``(y * g).sum()``, with the fold on, then off: for each, the output, the
    input, weight and norm gradients and the norm's buffers."""
    import copy

    from mmhat.models.layers import pointwise_then_norm, set_norm_fold
    runs = []
    for fold in (True, False):
        c, n = copy.deepcopy(conv), copy.deepcopy(norm)
        x = x0.clone().requires_grad_()
        set_norm_fold(fold)
        try:
            for _ in range(steps):
                y = pointwise_then_norm(c, n, x)
        finally:
            set_norm_fold(True)
        assert (type(y.grad_fn).__name__ == '_FoldedNormBackward') == fold
        (y * g).sum().backward()
        runs.append(dict(y=y, x=x.grad, w=c.weight.grad, **dict(n.named_buffers())))
        if n.affine:
            runs[-1].update(gamma=n.weight.grad, beta=n.bias.grad)
    return runs


@pytest.mark.parametrize('batch, c_in, c_out, hw', [(1, 8, 32, (5, 7)), (2, 16, 64, (3, 1)),
                                                    (3, 4, 5, (1, 1))])
@pytest.mark.parametrize('norm_kwargs', [{}, dict(momentum=None), dict(affine=False),
                                         dict(track_running_stats=False)],
                         ids=['default', 'cumulative', 'no-affine', 'no-running-stats'])
def test_pointwise_then_norm_equals_the_norm_of_the_conv(batch, c_in, c_out, hw, norm_kwargs):
    """The folded BatchNorm: outputs, running statistics (two steps, so that a cumulative
    average is exercised), every gradient and the layouts of ``norm(conv(x))`` in float64,
    on an input with a large mean (the covariance is centred)."""
    from mmhat.models.layers import PointwiseConv2d
    gen = torch.Generator().manual_seed(0)
    conv = PointwiseConv2d(c_in, c_out, bias=False).double().to(
        memory_format=torch.channels_last)
    norm = _batchnorm(c_out, torch.float64, **norm_kwargs)
    x0 = (torch.randn(batch, c_in, *hw, dtype=torch.float64, generator=gen) * 3 + 10
          ).contiguous(memory_format=torch.channels_last)
    g = torch.randn(batch, c_out, *hw, dtype=torch.float64, generator=gen).contiguous(
        memory_format=torch.channels_last)
    got, want = _folded_and_plain(conv, norm, x0, g, steps=2)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-10, msg=key)
    assert got['y'].is_contiguous(memory_format=torch.channels_last)
    assert got['x'].is_contiguous(memory_format=torch.channels_last)


def test_pointwise_then_norm_float32_stays_at_batchnorm_rounding():
    """In float32 (TransCNN's stage-1 widths, input mean 3, std 2) the fold is BatchNorm's
    output and gradients to rounding."""
    from mmhat.models.layers import PointwiseConv2d
    gen = torch.Generator().manual_seed(1)
    conv = PointwiseConv2d(64, 256, bias=False).to(memory_format=torch.channels_last)
    norm = _batchnorm(256, torch.float32)
    x0 = (torch.randn(2, 64, 19, 23, generator=gen) * 2 + 3).contiguous(
        memory_format=torch.channels_last)
    g = torch.randn(2, 256, 19, 23, generator=gen)
    got, want = _folded_and_plain(conv, norm, x0, g)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=2e-5,
                                   atol=2e-5 * want[key].abs().max().item(), msg=key)


def test_pointwise_then_norm_falls_back_where_it_does_not_apply():
    """Plain ``norm(conv(x))`` for: the switch off, no gradient, eval mode, NCHW maps, a
    conv with bias, one that does not expand or is wider than ``FOLD_MAX_IN_CHANNELS``, a
    SyncBatchNorm, a norm that is not a BatchNorm, a half-precision map; one value per
    channel gets BatchNorm's own error."""
    import copy

    from mmhat.models.layers import PointwiseConv2d, pointwise_then_norm, set_norm_fold
    from mmhat.models.layers.norm import FOLD_MAX_IN_CHANNELS

    def cl(c, h=3, w=4, batch=1):
        return torch.randn(batch, c, h, w).contiguous(memory_format=torch.channels_last)

    def folded(conv, norm, x):
        y = pointwise_then_norm(conv.to(memory_format=torch.channels_last), norm, x)
        return y.grad_fn is not None and type(y.grad_fn).__name__ == '_FoldedNormBackward'

    conv, norm = PointwiseConv2d(4, 8, bias=False), torch.nn.BatchNorm2d(8)
    assert folded(conv, norm, cl(4))
    set_norm_fold(False)
    try:
        assert not folded(conv, norm, cl(4))
    finally:
        set_norm_fold(True)
    with torch.no_grad():
        assert not folded(conv, norm, cl(4))
    assert not folded(conv, torch.nn.BatchNorm2d(8).eval(), cl(4))
    assert not folded(conv, norm, torch.randn(1, 4, 3, 4))
    assert not folded(copy.deepcopy(conv).bfloat16(), copy.deepcopy(norm).bfloat16(),
                      cl(4).bfloat16())
    assert not folded(PointwiseConv2d(4, 8), norm, cl(4))
    assert not folded(PointwiseConv2d(8, 8, bias=False), norm, cl(8))
    wide = FOLD_MAX_IN_CHANNELS * 2
    assert not folded(PointwiseConv2d(wide, wide * 2, bias=False),
                      torch.nn.BatchNorm2d(wide * 2), cl(wide))
    assert not folded(conv, torch.nn.SyncBatchNorm(8), cl(4))
    assert not folded(conv, torch.nn.GroupNorm(1, 8), cl(4))
    assert not folded(conv, torch.nn.Identity(), cl(4))
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        pointwise_then_norm(conv, norm, cl(4, 1, 1))
    # widths that do not fit: the conv's and the norm's own messages
    with pytest.raises(RuntimeError, match='expected input.* to have 4 channels'):
        pointwise_then_norm(conv, norm, cl(5))
    with pytest.raises(RuntimeError, match='running_mean should contain 8 elements'):
        pointwise_then_norm(conv, torch.nn.BatchNorm2d(9), cl(4))


def test_norm_fold_off_by_environment():
    import subprocess
    import sys
    code = 'from mmhat.models.layers import use_norm_fold; print(use_norm_fold())'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         env={**__import__('os').environ, 'MMHAT_NORM_FOLD': '0'}, check=True)
    assert out.stdout.strip() == 'False'


def test_act_then_conv_activates_the_depthwise_input_into_its_frame(monkeypatch):
    """A k >= 5 depthwise weight gradient reads act(x) from its zero-bordered frame:
    ``act_then_conv`` activates x straight into the frame's interior, so nothing copies the
    input; the values are those of ``conv(act(x))``."""
    from mmhat.models.layers import DepthwiseConv2d, act_then_conv
    from mmhat.models.layers import conv as conv_module
    frames = []
    real = conv_module.depthwise_weight_grad_in_blocks
    monkeypatch.setattr(conv_module, 'depthwise_weight_grad_in_blocks',
                        lambda g, frame, k: frames.append(frame.data_ptr()) or real(g, frame, k))
    conv = DepthwiseConv2d(6, 5).double().to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    with torch.profiler.profile(record_shapes=True) as prof:
        act_then_conv(torch.nn.SiLU(), conv, x).sum().backward()
    assert frames == [conv_module.scratch(1, torch.float64, x.device).data_ptr()]
    # the output gradient goes into its frame (one copy of a map); the input is activated
    # into its own
    assert sum(e.name == 'aten::copy_' and list(x.shape) in e.input_shapes
               for e in prof.events()) == 1
