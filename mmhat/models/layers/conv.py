"""Convolutions with the math, parameters and state-dict keys of ``nn.Conv2d``, whose CPU
training step avoids two slow oneDNN/THNN kernels on channels-last maps, and
:func:`act_then_conv`, which keeps half of an inverted residual's expanded maps.

The two kernels were found by ``tools/benchmark.py --profile`` (docs/benchmarks.md, "Training
step: where the time went before the kernels"). Each is faster on its own shapes, measured
alone; in the whole step ``tools/benchmark.py --kernels both --interleave`` measured them
with :func:`act_then_conv` 1.06-1.16x faster than plain ``nn.Conv2d`` and autograd
(HAT-Net-T, TransCNN-T, 800x1216, batch 1 and 2; docs/benchmarks.md, "Training step"):

* :class:`PointwiseConv2d` (1x1, stride 1): on a channels-last map the 1x1 convolution *is*
  a ``Linear`` over the last axis of the NHWC view, so when a gradient is recorded it runs as
  ``F.linear``. PyTorch sends single-threaded 1x1 convolutions to THNN's ``slow_conv2d``,
  whose backward is up to 1.8x slower than the two matrix products of ``linear``'s (384 ->
  48 channels at 200x304: 168 ms against 96 ms). Inference keeps ``nn.Conv2d``: there the
  benchmark measured the two the same or the linear slower (up to 10% at batch 2).
* :class:`DepthwiseConv2d` (``groups == channels``, stride 1): oneDNN's weight gradient of a
  channels-last depthwise convolution with a kernel of 5 or more is slow (5x5, 256 channels,
  200x304: 578 ms; 259 ms in NCHW), while its input gradient and forward are fast
  channels-last. The weight gradient alone is computed on NCHW copies of the two operands
  by PyTorch's native convolution (``Slow2d``: per channel, an im2col of one plane and one
  matrix-vector product), 95 ms on those shapes (:func:`native_depthwise_weight_grad`).

Either falls back to ``nn.Conv2d.forward`` wherever it would not help or cannot apply:
other devices, NCHW maps, tracing / scripting / ONNX export (so FLOP counters and exported
graphs still see convolutions), CPU autocast (for the kernels with their own backward), and
when :func:`set_cpu_kernels` (or ``MMHAT_CPU_KERNELS=0``) turns them off, which is how the
benchmark measures plain ``nn.Conv2d`` in the same run.
"""
import threading
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mmhat import compat
from .switches import env_switch

#: input, weight and bias gradients (None where not asked for)
Gradients = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]

_ENABLED = env_switch('MMHAT_CPU_KERNELS')
_ACT_RECOMPUTE = env_switch('MMHAT_ACT_RECOMPUTE')

#: the smallest depthwise kernel whose channels-last weight gradient is the slow one
#: (3x3 is faster channels-last: 80 ms against 179 ms at 384 channels, 200x304)
SLOW_DEPTHWISE_WGRAD_KERNEL = 5


def set_cpu_kernels(enable: bool) -> None:
    """Use (True, the default) or bypass the CPU training kernels of this module."""
    global _ENABLED
    _ENABLED = bool(enable)


def use_cpu_kernels() -> bool:
    """Whether :class:`PointwiseConv2d` / :class:`DepthwiseConv2d` may leave ``nn.Conv2d``."""
    return _ENABLED


def set_act_recompute(enable: bool) -> None:
    """Use (True, the default) or bypass :func:`act_then_conv`'s recomputation."""
    global _ACT_RECOMPUTE
    _ACT_RECOMPUTE = bool(enable)


def use_act_recompute() -> bool:
    return _ACT_RECOMPUTE


def _applies(x: torch.Tensor) -> bool:
    """A CPU channels-last map in eager mode."""
    return (x.device.type == 'cpu' and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not torch.onnx.is_in_onnx_export())


def own_backward_applies(x: torch.Tensor) -> bool:
    """Where a kernel with its own backward may run: as :func:`_applies`, and outside CPU
    autocast (its backward would meet bfloat16 gradients with float32 operands)."""
    return _applies(x) and not compat.is_autocast_enabled('cpu')


def nchw_copy(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A channels-last ``(B, C, H, W)`` map copied into NCHW strides (into ``out``, an NCHW
    tensor of its shape, where given).

    One 2-D ``(H*W, C) -> (C, H*W)`` transpose per image, which PyTorch copies blocked; its
    4-D ``x.contiguous()`` is about twice as slow (256 x 200 x 304: 117 ms against 57 ms).
    """
    B, C, H, W = x.shape
    if out is None:
        out = torch.empty(B, C, H, W, dtype=x.dtype, device=x.device)
    planes = out.view(B, C, H * W)  # (B, C, H*W)
    for b in range(B):
        planes[b].copy_(x[b].flatten(1))  # (C, H*W) <- the (C, H*W) view with strides (1, C)
    return out  # (B, C, H, W), NCHW strides


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)``, computed as ``F.linear`` on NHWC maps
    when a gradient is recorded."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return self.training_forward(x)

    def training_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution as a training step computes it: ``F.linear`` on the NHWC view
        where the kernels apply, else ``nn.Conv2d``'s."""
        if not (_ENABLED and _applies(x)) or x.shape[1] != self.in_channels:
            return super().forward(x)  # a wrong width gets nn.Conv2d's own error
        weight = self.weight.flatten(1)  # (C_out, C_in)
        y = F.linear(x.permute(0, 2, 3, 1), weight, self.bias)  # (B, H, W, C_out)
        return y.permute(0, 3, 1, 2)  # (B, C_out, H, W), channels-last strides

    def gradients(self, grad: torch.Tensor, x: torch.Tensor,
                  needs: Tuple[bool, bool, bool]) -> Gradients:
        """The gradients of input, weight and bias (where ``needs`` says) for the output
        gradient ``grad`` at input ``x``: ``linear``'s backward, two matrix products (with
        the kernels off: ``nn.Conv2d``'s)."""
        if not _ENABLED:
            return _conv_gradients(self, grad, x, needs)
        B, C_out, H, W = grad.shape
        grad_y = grad.permute(0, 2, 3, 1).reshape(B * H * W, C_out)  # (B*H*W, C_out)
        grad_x = grad_w = grad_b = None
        if needs[0]:
            grad_x = (grad_y @ self.weight.flatten(1)).view(B, H, W, -1)  # (B, H, W, C_in)
            grad_x = grad_x.permute(0, 3, 1, 2)  # (B, C_in, H, W), channels-last strides
        if needs[1]:
            tokens = x.permute(0, 2, 3, 1).reshape(B * H * W, -1)  # (B*H*W, C_in)
            grad_w = (grad_y.t() @ tokens).view(self.weight.shape)  # (C_out, C_in, 1, 1)
        if needs[2] and self.bias is not None:
            grad_b = grad_y.sum(0)  # (C_out,)
        return grad_x, grad_w, grad_b


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels)``; for ``k >= 5``
    on channels-last CPU maps the weight gradient is computed in NCHW."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2,
                         groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not _ENABLED or self.kernel_size[0] < SLOW_DEPTHWISE_WGRAD_KERNEL
                or not self.weight.requires_grad or not torch.is_grad_enabled()
                or not own_backward_applies(x)):
            return super().forward(x)
        return conv_with_own_gradients(self, x)

    def nchw_weight_grad(self) -> bool:
        """Whether :meth:`gradients` computes the weight gradient in NCHW (``k >= 5``)."""
        return _ENABLED and self.kernel_size[0] >= SLOW_DEPTHWISE_WGRAD_KERNEL

    def gradients(self, grad: torch.Tensor, x: torch.Tensor, needs: Tuple[bool, bool, bool],
                  x_nchw: Optional[torch.Tensor] = None) -> Gradients:
        """The gradients of input, weight and bias (where ``needs`` says) for the output
        gradient ``grad`` at input ``x``: oneDNN's on the channels-last operands, except the
        weight gradient of ``k >= 5``, from NCHW copies of them by the native kernel
        (:func:`native_depthwise_weight_grad`; with the kernels off: all as ``nn.Conv2d``'s).

        ``x_nchw``, where :meth:`nchw_weight_grad`: the input already in NCHW strides, for
        the weight gradient; ``x`` then only gives the input gradient its shape and layout
        (it reads no input values), so any map of that shape and layout will do.
        """
        nchw_weight_grad = needs[1] and self.nchw_weight_grad()
        if x_nchw is not None and not nchw_weight_grad:
            raise ValueError('x_nchw is only read by an NCHW weight gradient (k >= 5, asked for)')
        grad_x, grad_w, grad_b = _conv_gradients(
            self, grad, x, (needs[0], needs[1] and not nchw_weight_grad, needs[2]))
        if nchw_weight_grad:
            grad_w = native_depthwise_weight_grad(
                self, nchw_copy(grad), nchw_copy(x) if x_nchw is None else x_nchw)
        return grad_x, grad_w, grad_b


def native_depthwise_weight_grad(conv: nn.Conv2d, grad: torch.Tensor,
                                 x: torch.Tensor) -> torch.Tensor:
    """The weight gradient ``(C, 1, k, k)`` of the depthwise ``conv`` for the NCHW output
    gradient ``grad`` at the NCHW input ``x``, by PyTorch's native CPU convolution.

    With oneDNN enabled, ``convolution_backward`` sends a CPU depthwise convolution to oneDNN,
    whose weight gradient is 2.7x (NCHW) to 6x (channels-last) slower than the native
    ``Slow2d`` kernel for k >= 5 (5x5, 256 channels, 200x304, one thread: 259 / 578 ms
    against 95 ms; 1024 channels, 50x76: 66 / 141 against 28 ms). The only way to choose the
    native kernel is to disable oneDNN while this call runs: the switch is process-wide, so
    a convolution that another thread starts meanwhile also runs natively (same result,
    slower).
    """
    conv_args = (list(conv.stride), list(conv.padding), list(conv.dilation), False, [0, 0],
                 conv.groups)
    # ``contiguous()`` keeps a (C, 1, k, k) channels-last weight as it is (its size-1 axis
    # makes it contiguous too): clone it into NCHW strides, as the native kernel reads it.
    nchw_weight = conv.weight.detach().clone(memory_format=torch.contiguous_format)
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return torch.ops.aten.convolution_backward(
            grad, x, nchw_weight, None, *conv_args, [False, True, False])[1]  # (C, 1, k, k)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def _conv_gradients(conv: nn.Conv2d, grad: torch.Tensor, x: torch.Tensor,
                    needs: Tuple[bool, bool, bool]) -> Gradients:
    """``nn.Conv2d``'s own backward (``convolution_backward``) where ``needs`` says."""
    if not (needs[0] or needs[1]):
        grad_x = grad_w = None
    else:
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, conv.weight, None, list(conv.stride), list(conv.padding),
            list(conv.dilation), False, [0, 0], conv.groups, [needs[0], needs[1], False])
    grad_b = grad.sum((0, 2, 3)) if needs[2] and conv.bias is not None else None  # (C_out,)
    return grad_x, grad_w, grad_b


def conv_with_own_gradients(conv: nn.Conv2d, x: torch.Tensor,
                            compute: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                            ) -> torch.Tensor:
    """``conv(x)`` that keeps only ``x`` and whose backward is ``conv.gradients``; the
    forward's output is ``compute(x)`` where given (``F.conv2d`` otherwise): the same values
    another way, or a placeholder where nothing will read them
    (:func:`~mmhat.models.layers.attention_input`)."""
    return _ConvWithOwnGradients.apply(x, conv.weight, conv.bias, conv, compute)


class _ConvWithOwnGradients(torch.autograd.Function):
    """:func:`conv_with_own_gradients` (weight and bias are arguments so that autograd
    asks for their gradients)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                conv: nn.Conv2d, compute: Optional[Callable]) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.conv = conv
        if compute is not None:
            return compute(x)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return ctx.conv.gradients(grad, x, ctx.needs_input_grad[:3]) + (None, None)


def act_then_conv(act: nn.Module, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(act(x))``, keeping only ``x`` for the backward, which recomputes ``act(x)``.

    Autograd would keep both ``x`` (the activation's backward needs it) and ``act(x)`` (the
    convolution's weight gradient does): two maps of the expanded width in an inverted
    residual. Recomputing the activation costs one element-wise pass in the backward and
    frees one of them (HAT-Net-T, 800x1216: peak 2484 -> 1750 MB). Applies where the conv
    kernels do (CPU, channels-last, eager, no autocast), for :class:`PointwiseConv2d` /
    :class:`DepthwiseConv2d` and an activation that is not in-place, unless
    :func:`set_act_recompute` (``MMHAT_ACT_RECOMPUTE=0``) turns it off (independently of
    :func:`set_cpu_kernels`: with those off, the convolution's backward is ``nn.Conv2d``'s).
    """
    if (_ACT_RECOMPUTE and isinstance(conv, (PointwiseConv2d, DepthwiseConv2d))
            and torch.is_grad_enabled()
            and not getattr(act, 'inplace', False) and own_backward_applies(x)
            and (x.requires_grad or any(p.requires_grad for p in conv.parameters()))):
        return _ActThenConv.apply(x, conv.weight, conv.bias, act, conv)
    return conv(act(x))


class _ActThenConv(torch.autograd.Function):
    """``conv(act(x))`` saving ``x`` only; the backward recomputes ``act(x)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                act: nn.Module, conv: nn.Conv2d) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.act, ctx.conv = act, conv
        into = _ACT_INTO.get(type(act))
        if into is None:
            return conv(act(x))
        return conv(into.forward(act, x, scratch_like(x)))  # act(x) lives only until conv

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        into = _ACT_INTO.get(type(ctx.act))
        conv = ctx.conv
        if into is not None and need_w and isinstance(conv, DepthwiseConv2d) \
                and conv.nchw_weight_grad():
            # Only the weight gradient reads act(x), in NCHW: copy x there once (into the
            # buffer) and activate it in place, instead of activating into the buffer and
            # copying that into a fresh NCHW map (a page-faulting one where it is large)
            activated = nchw_copy(x, out=scratch_like(x, contiguous=True))
            into.forward(ctx.act, activated, activated)
            grad_act, grad_w, grad_b = conv.gradients(grad, x, (need_x, need_w, need_b),
                                                      x_nchw=activated)
            grad_x = into.backward(ctx.act, grad_act, x, grad_act) if need_x else None
            return grad_x, grad_w, grad_b, None, None
        if into is not None:
            activated = into.forward(ctx.act, x, scratch_like(x))
            grad_act, grad_w, grad_b = conv.gradients(grad, activated, (need_x, need_w, need_b))
            # grad_act is the convolution's fresh output, needed by nothing else: the input
            # gradient overwrites it element by element
            grad_x = into.backward(ctx.act, grad_act, x, grad_act) if need_x else None
            return grad_x, grad_w, grad_b, None, None
        with torch.enable_grad():
            x = x.detach().requires_grad_(need_x)
            activated = ctx.act(x)
        grad_act, grad_w, grad_b = ctx.conv.gradients(grad, activated.detach(),
                                                      (need_x, need_w, need_b))
        grad_x = torch.autograd.grad(activated, x, grad_act)[0] if need_x else None
        return grad_x, grad_w, grad_b, None, None


class _ActivationInto(NamedTuple):
    """An activation's forward and input gradient, each written into a given tensor."""
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # act, x, out
    backward: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor],
                       torch.Tensor]  # act, grad, x, out


#: The activations whose maps :func:`act_then_conv` writes into buffers it already has;
#: others go through the module and autograd. A fresh CPU buffer above glibc's 32 MiB mmap
#: threshold is paged in on first write, which costs as much as the element-wise pass
#: itself (SiLU of one 93 MB map of HAT-Net-T's stage 1: 48 ms, 10 ms into a used buffer).
_ACT_INTO = {
    nn.SiLU: _ActivationInto(
        lambda act, x, out: torch.ops.aten.silu.out(x, out=out),
        lambda act, grad, x, out: torch.ops.aten.silu_backward.grad_input(
            grad, x, grad_input=out)),
    nn.GELU: _ActivationInto(
        lambda act, x, out: torch.ops.aten.gelu.out(x, approximate=act.approximate, out=out),
        lambda act, grad, x, out: torch.ops.aten.gelu_backward.grad_input(
            grad, x, approximate=act.approximate, grad_input=out)),
}


class _Scratch(threading.local):
    buffer: Optional[torch.Tensor] = None


_SCRATCH = _Scratch()


def scratch_like(x: torch.Tensor, contiguous: bool = False) -> torch.Tensor:
    """An uninitialised tensor with the shape, strides and dtype of the (contiguous or
    channels-last contiguous) tensor ``x`` (``contiguous``: with contiguous strides
    whatever ``x``'s are), in a buffer of this thread that every call
    reuses (it holds the largest such tensor asked for so far): valid until the next call,
    for maps that live inside one operation (:func:`act_then_conv`'s activation, between it
    and the convolution)."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError('scratch_like needs a contiguous or channels-last contiguous tensor')
    buf = _SCRATCH.buffer
    if (buf is None or buf.numel() < x.numel() or buf.dtype != x.dtype
            or buf.device != x.device):
        buf = _SCRATCH.buffer = None  # free the old buffer before taking the new one
        buf = _SCRATCH.buffer = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
    if contiguous:
        return buf[:x.numel()].view(x.shape)  # x's shape, contiguous strides
    return buf.as_strided(x.shape, x.stride())
