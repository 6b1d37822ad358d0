"""Convolutions with the math, parameters and state-dict keys of ``nn.Conv2d``, whose CPU
training step avoids two slow oneDNN/THNN kernels on channels-last maps.

Both were found by ``tools/benchmark.py --profile`` (docs/benchmarks.md, "Training step:
where the time goes") and are kept because ``tools/benchmark.py --kernels both`` shows the
step faster with them, in one run against plain ``nn.Conv2d``:

* :class:`PointwiseConv2d` (1x1, stride 1): on a channels-last map the 1x1 convolution *is*
  a ``Linear`` over the last axis of the NHWC view, so it runs as ``F.linear``. PyTorch
  sends single-threaded 1x1 convolutions to THNN's ``slow_conv2d``, whose backward is up to
  1.8x slower than the two matrix products of ``linear``'s (384 -> 48 channels at 200x304:
  168 ms against 96 ms).
* :class:`DepthwiseConv2d` (``groups == channels``, stride 1): oneDNN's weight gradient of a
  channels-last depthwise convolution with a kernel of 5 or more is about twice as slow as
  the NCHW one (5x5, 256 channels, 200x304: 588 ms against 290 ms), while its input
  gradient and forward are faster channels-last. The weight gradient alone is computed on
  NCHW copies of the two operands.

Either falls back to ``nn.Conv2d.forward`` wherever it would not help or cannot apply:
other devices, NCHW maps, tracing / scripting / ONNX export (so FLOP counters and exported
graphs still see convolutions), and when :func:`set_cpu_kernels` (or
``MMHAT_CPU_KERNELS=0``) turns them off, which is how the benchmark measures plain
``nn.Conv2d`` in the same run.
"""
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

_ENABLED = os.environ.get('MMHAT_CPU_KERNELS', '1') not in ('0', 'false', 'False')

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


def _applies(x: torch.Tensor) -> bool:
    """A CPU channels-last map in eager mode with the kernels on."""
    return (_ENABLED and x.device.type == 'cpu' and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not torch.onnx.is_in_onnx_export())


def nchw_copy(x: torch.Tensor) -> torch.Tensor:
    """A channels-last ``(B, C, H, W)`` map copied into NCHW strides.

    One 2-D ``(H*W, C) -> (C, H*W)`` transpose per image, which PyTorch copies blocked; its
    4-D ``x.contiguous()`` is about twice as slow (256 x 200 x 304: 117 ms against 57 ms).
    """
    B, C, H, W = x.shape
    out = torch.empty(B, C, H * W, dtype=x.dtype, device=x.device)  # (B, C, H*W)
    for b in range(B):
        out[b].copy_(x[b].flatten(1))  # (C, H*W) <- the (C, H*W) view with strides (1, C)
    return out.view(B, C, H, W)  # (B, C, H, W), NCHW strides


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)``, computed as ``F.linear`` on NHWC maps."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _applies(x):
            return super().forward(x)
        weight = self.weight.flatten(1)  # (C_out, C_in)
        y = F.linear(x.permute(0, 2, 3, 1), weight, self.bias)  # (B, H, W, C_out)
        return y.permute(0, 3, 1, 2)  # (B, C_out, H, W), channels-last strides


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels)``; for ``k >= 5``
    on channels-last CPU maps the weight gradient is computed in NCHW."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2,
                         groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.kernel_size[0] < SLOW_DEPTHWISE_WGRAD_KERNEL or not self.weight.requires_grad
                or not torch.is_grad_enabled() or not _applies(x)):
            return super().forward(x)
        return _NCHWWeightGradDepthwise.apply(x, self.weight, self.bias, self.padding)


class _NCHWWeightGradDepthwise(torch.autograd.Function):
    """Stride-1 depthwise convolution; backward: input gradient as oneDNN gives it on the
    channels-last operands, weight gradient from NCHW copies of them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                padding: Tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        conv_args = ([1, 1], list(ctx.padding), [1, 1], False, [0, 0], x.shape[1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, *conv_args, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            # ``contiguous()`` keeps a (C, 1, k, k) channels-last weight as it is (its size-1
            # axis makes it contiguous too) and oneDNN would go channels-last again from it:
            # clone it into NCHW strides.
            nchw_weight = weight.clone(memory_format=torch.contiguous_format)  # (C, 1, k, k)
            grad_w = torch.ops.aten.convolution_backward(
                nchw_copy(grad), nchw_copy(x), nchw_weight, None, *conv_args,
                [False, True, False])[1]  # (C, 1, k, k)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))  # (C,)
        return grad_x, grad_w, grad_b, None
