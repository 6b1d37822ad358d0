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
  200x304, one thread, AMD EPYC: 578 ms; 259 ms in NCHW), its 3x3 one fast. A ``k x k``
  weight gradient is assembled from 3x3 ones (:func:`depthwise_weight_grad_in_blocks`: four
  for 5x5), each reading the output gradient and the input in zero-bordered frames whose
  offsets move the 3x3 window over the ``k x k`` one; no copy changes the layout. On those
  shapes (Intel Xeon, one thread) 110 ms, against 330 ms for the route it replaced: NCHW
  copies of both operands and PyTorch's native kernel, an im2col and a matrix-vector
  product per channel (which needed oneDNN switched off process-wide during the call).

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
    """``nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels)``; for odd
    ``k >= 5`` on channels-last CPU maps the weight gradient is assembled from 3x3 ones
    (:func:`depthwise_weight_grad_in_blocks`)."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2,
                         groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.weight_grad_in_blocks() or not self.weight.requires_grad
                or not torch.is_grad_enabled() or not own_backward_applies(x)):
            return super().forward(x)
        return conv_with_own_gradients(self, x)

    def weight_grad_in_blocks(self) -> bool:
        """Whether :meth:`gradients` assembles the weight gradient from 3x3 ones (odd square
        ``k >= 5``, stride 1, no dilation, padding ``k // 2``; the kernels on)."""
        k = self.kernel_size[0]
        return (_ENABLED and k >= SLOW_DEPTHWISE_WGRAD_KERNEL and k % 2 == 1
                and self.kernel_size == (k, k) and self.stride == (1, 1)
                and self.dilation == (1, 1) and self.padding == (k // 2, k // 2)
                and self.groups == self.in_channels == self.out_channels)

    def input_frame(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The zero-bordered frame that :meth:`gradients` reads the input from, in this
        thread's buffer (:func:`scratch`), and the ``(B, C, H, W)`` view of its
        interior, where the caller writes the input (``x`` gives shape and dtype)."""
        return input_frame(x, self.kernel_size[0])

    def gradients(self, grad: torch.Tensor, x: torch.Tensor, needs: Tuple[bool, bool, bool],
                  x_frame: Optional[torch.Tensor] = None) -> Gradients:
        """The gradients of input, weight and bias (where ``needs`` says) for the output
        gradient ``grad`` at input ``x``: oneDNN's on the channels-last operands, except the
        weight gradient where :meth:`weight_grad_in_blocks` (then from 3x3 blocks; with the
        kernels off: all as ``nn.Conv2d``'s).

        ``x_frame``, where the weight gradient is assembled: the input already in the frame
        of :meth:`input_frame`; ``x`` then only gives the input gradient its shape and
        layout (it reads no input values), so any map of that shape and layout will do.
        """
        in_blocks = needs[1] and self.weight_grad_in_blocks()
        if x_frame is not None and not in_blocks:
            raise ValueError('x_frame is only read by a weight gradient assembled from 3x3 '
                             'blocks (odd k >= 5, asked for)')
        grad_x, grad_w, grad_b = _conv_gradients(
            self, grad, x, (needs[0], needs[1] and not in_blocks, needs[2]))
        if in_blocks:
            if x_frame is None:
                x_frame, interior = self.input_frame(x)
                interior.copy_(x)
            grad_w = depthwise_weight_grad_in_blocks(grad, x_frame, self.kernel_size[0])
        return grad_x, grad_w, grad_b


class _Frame(NamedTuple):
    """Where a ``(B, C, H, W)`` map sits in the zero-bordered frames of
    :func:`depthwise_weight_grad_in_blocks`: ``(B, C, rows, cols)`` channels-last frames,
    one after the other, then ``reach`` zero positions (a position: C values)."""
    rows: int
    cols: int
    reach: int

    @staticmethod
    def of(hw: Tuple[int, int], k: int) -> '_Frame':
        H, W = hw
        p = k // 2
        cols = W + 2 * p
        # rows: the output gradient needs one zero row above and below; the input p, and
        # may read p rows past its frame, into the next frame's top rows (or the reach)
        return _Frame(H + max(2, p), cols, (k - 3) * (cols + 1))

    def view(self, buf: torch.Tensor, shape: torch.Size, offset: int = 0) -> torch.Tensor:
        """The ``(B, C, rows, cols)`` channels-last frames of ``buf`` (1-D) from position
        ``offset`` on."""
        B, C = shape[:2]
        return buf.as_strided((B, C, self.rows, self.cols),
                              (self.rows * self.cols * C, 1, self.cols * C, C), offset * C)

    def numel(self, shape: torch.Size) -> int:
        B, C = shape[:2]
        return (B * self.rows * self.cols + self.reach) * C


def _bordered(frame: _Frame, buf: torch.Tensor, shape: torch.Size, top: int,
              left: int) -> torch.Tensor:
    """Zero everything of ``buf``'s frames but the ``(H, W)`` interior at ``(top, left)``
    (and the reach); return the interior's ``(B, C, H, W)`` view."""
    H, W = shape[-2:]
    framed = frame.view(buf, shape)  # (B, C, rows, cols)
    framed[:, :, :top].zero_()
    framed[:, :, top + H:].zero_()
    framed[:, :, top:top + H, :left].zero_()
    framed[:, :, top:top + H, left + W:].zero_()
    end = frame.numel(shape)
    buf[end - frame.reach * shape[1]:end].zero_()
    return framed[:, :, top:top + H, left:left + W]  # (B, C, H, W)


def input_frame(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The input frame of a ``k x k`` depthwise weight gradient for maps shaped like ``x``,
    in this thread's buffer (:func:`scratch`): ``(buffer, interior)``, the interior the
    ``(B, C, H, W)`` view where the input goes (``k // 2`` zero rows and columns around it)."""
    frame = _Frame.of(x.shape[-2:], k)
    buf = scratch(frame.numel(x.shape), x.dtype, x.device)
    return buf, _bordered(frame, buf, x.shape, k // 2, k // 2)


def depthwise_weight_grad_in_blocks(grad: torch.Tensor, x_frame: torch.Tensor,
                                    k: int) -> torch.Tensor:
    """The weight gradient ``(C, 1, k, k)`` of a ``k x k`` depthwise convolution (odd k,
    stride 1, padding ``k // 2``) for the channels-last output gradient ``grad``
    ``(B, C, H, W)``, at the input in ``x_frame`` (:func:`input_frame`), as
    ``ceil((k - 1) / 2) ** 2`` 3x3 weight gradients (oneDNN's fast kernel on CPU; 5x5: four).

    The output gradient is copied into frames of the same width with one zero row and
    column around it. The 3x3 weight gradient (padding 1) of frames ``G`` and ``X`` sums
    ``G[y, u] * X[y + a - 1, u + b - 1]``; ``X``, the input frames seen from position
    ``di * cols + dj`` on, holds the input moved by ``(di, dj)``, so block ``(di, dj)`` gives
    the ``k x k`` entries ``(di + a, dj + b)``. Where ``G`` is not zero its reads stay inside
    the frame's rows and columns, so the only values they meet are the input and its zero
    border (rows below a frame are the next frame's zero top rows, or the reach).
    """
    B, C, H, W = grad.shape
    frame = _Frame.of((H, W), k)
    if x_frame.dim() != 1 or x_frame.numel() != frame.numel(grad.shape):
        raise ValueError(f'x_frame has shape {tuple(x_frame.shape)}; the input frame of a '
                         f'{k}x{k} weight gradient at {tuple(grad.shape)} holds '
                         f'{frame.numel(grad.shape)} values: make it with input_frame')
    g_buf = torch.empty(frame.numel(grad.shape), dtype=grad.dtype, device=grad.device)
    _bordered(frame, g_buf, grad.shape, 1, 1).copy_(grad)
    g_frame = frame.view(g_buf, grad.shape)  # (B, C, rows, cols)
    weight3 = grad.new_zeros(C, 1, 3, 3)  # only its shape is read
    out = grad.new_empty(C, 1, k, k)
    starts = range(0, k - 2, 2)  # 3x3 blocks covering 0..k-1 (the last may overlap)
    for di in starts:
        for dj in starts:
            x_moved = frame.view(x_frame, grad.shape, di * frame.cols + dj)  # (B, C, rows, cols)
            out[:, :, di:di + 3, dj:dj + 3] = torch.ops.aten.convolution_backward(
                g_frame, x_moved, weight3, None, [1, 1], [1, 1], [1, 1], False, [0, 0], C,
                [False, True, False])[1]  # (C, 1, 3, 3)
    return out


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


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     kernel_size: Optional[int] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)``: a depthwise convolution with
    a ``(C, 1, k, k)`` kernel given as a tensor (shared, repeated or assembled from several
    modules' kernels), whose weight gradient for odd ``k >= 5`` on channels-last CPU maps
    is assembled from 3x3 ones (:func:`depthwise_weight_grad_in_blocks`), the input gradient
    oneDNN's. Elsewhere (NCHW, other devices, tracing, compiling, autocast, no weight
    gradient, :func:`set_cpu_kernels` off) it is ``F.conv2d``. ``kernel_size``: ``k`` as a
    Python int, where the caller has it (a traced ``weight.shape`` is a tensor, which torch
    2.1's tracer cannot pass as a padding)."""
    k = kernel_size if kernel_size is not None else weight.shape[-1]
    if (_ENABLED and k >= SLOW_DEPTHWISE_WGRAD_KERNEL and k % 2 == 1 and weight.dim() == 4
            and weight.shape[1:] == (1, k, k) and weight.shape[0] == x.shape[1]
            and torch.is_grad_enabled() and weight.requires_grad and own_backward_applies(x)
            and not compat.is_compiling()):
        return _DepthwiseConv.apply(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=k // 2, groups=x.shape[1])


class _DepthwiseConv(torch.autograd.Function):
    """:func:`depthwise_conv2d` where the weight gradient is assembled from 3x3 blocks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        k, C = weight.shape[-1], x.shape[1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [k // 2] * 2, [1, 1], False, [0, 0], C,
                [True, False, False])[0]  # (B, C, H, W)
        if ctx.needs_input_grad[1]:
            frame, interior = input_frame(x, k)
            interior.copy_(x)
            grad_w = depthwise_weight_grad_in_blocks(grad, frame, k)  # (C, 1, k, k)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))  # (C,)
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
                and conv.weight_grad_in_blocks():
            # Only the weight gradient reads act(x), in its zero-bordered frame: activate x
            # straight into the frame's interior
            frame, interior = conv.input_frame(x)
            into.forward(ctx.act, x, interior)
            grad_act, grad_w, grad_b = conv.gradients(grad, x, (need_x, need_w, need_b),
                                                      x_frame=frame)
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


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``numel`` uninitialised values (1-D) in a buffer of this thread that every call reuses
    (it holds the largest such tensor asked for so far): valid until the next call, for maps
    that live inside one operation (:func:`act_then_conv`'s activation, between it and the
    convolution)."""
    buf = _SCRATCH.buffer
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
        buf = _SCRATCH.buffer = None  # free the old buffer before taking the new one
        buf = _SCRATCH.buffer = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def scratch_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor with the shape, strides and dtype of the (contiguous or
    channels-last contiguous) tensor ``x`` in this thread's buffer (:func:`scratch`)."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError('scratch_like needs a contiguous or channels-last contiguous tensor')
    return scratch(x.numel(), x.dtype, x.device).as_strided(x.shape, x.stride())
