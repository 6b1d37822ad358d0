"""GroupMixFormer: Vision Transformers with Group-Mix Attention.

Paper: Chongjian Ge, Xiaohan Ding, Zhan Tong, Li Yuan, Jiangliu Wang, Yibing Song, Ping Luo,
"Advancing Vision Transformers with Group-Mix Attention", arXiv 2311.15157 (2023).
Official classification code: AILab-CVC/GroupMixFormer at commit 3d3f409,
``models/groupmixformer.py`` and ``configs/groupmixformer_*.yaml`` (MIT licence). This file
is an independent implementation; equality with the official model is proven by
``tests/test_backbones/test_groupmixformer.py`` on the reference case.

Group-Mix Attention (paper Sec. 3) in one paragraph: the ``qkv`` projection is cut along
channels into five equal segments. The first four feed a factorised (linear) attention
whose heads see different granularities: segment 0 the tokens themselves, segments 1-3
"group proxies", i.e. the tokens aggregated by depthwise-separable 3x3, 5x5 and 7x7 convs.
The fifth segment skips attention: a separable conv over its q, k and v slices, the
"local branch", is concatenated to the attention output before the projection.

Dense prediction (what differs from the official classifier, see :class:`GroupMixFormer`):
the official patch embedding reports ``floor(H / 2)`` while its conv produces
``ceil(H / 2)``, so the official model only runs at multiples of 32. Here every stage
takes its size from the conv output, which equals the official size whenever the
official model runs.
"""
import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.model.weight_init import trunc_normal_
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmhat.registry import MODELS
from ..layers import depthwise_conv2d, drop_path, kept_linear, nchw_to_nlc, nlc_to_nchw
from .base import Publication, PyramidBackbone, PyramidStage

#: Kernel sizes of the group proxies: segment ``1 + i`` of q/k/v is aggregated by a
#: depthwise-separable conv of kernel ``PROXY_KERNEL_SIZES[i]``. Segment 0 is not
#: aggregated (token level), and one more segment feeds the local branch, so the channels
#: are cut into ``len(PROXY_KERNEL_SIZES) + 2`` = 5 segments.
PROXY_KERNEL_SIZES = (3, 5, 7)
#: Kernel of the local (non-attention) branch's separable conv.
LOCAL_KERNEL_SIZE = 3
#: Segments of q/k/v: the token level, the proxies, the local branch.
NUM_SEGMENTS = len(PROXY_KERNEL_SIZES) + 2
#: Convolutional relative position encoding: (kernel size, number of heads) in head
#: order. Heads 0-1 use 3x3, heads 2-4 5x5, heads 5-7 7x7. It groups the heads 2/3/3
#: while the proxies group them 2/2/2/2; the official model does so.
CRPE_WINDOWS = ((3, 2), (5, 3), (7, 3))
#: Hidden activations per FFN chunk at inference (2**18 floats = 1 MiB, an L2 cache): the
#: FFN runs on ``FFN_CHUNK_ELEMENTS // hidden_dims`` tokens at a time, which measured faster
#: on CPU than all tokens at once (docs/benchmarks.md).
FFN_CHUNK_ELEMENTS = 2**18
#: Under ``with_cp``, the blocks of stage index ``KEEP_PRODUCTS_FROM_STAGE`` on (strides 16
#: and 32) keep their ``qkv`` and ``fc1`` products from the forward for the recomputation
#: (:func:`~mmhat.models.layers.kept_linear`). There a kept element saves ``embed_dims``
#: multiply-adds (the widest blocks), the maps are small, and every variant has most of its
#: blocks (mini: 16 of 22, about 70% of the recomputed GEMMs for 220 MB at 800x1216); and
#: their backward runs first, so the kept products are freed before the recomputation of
#: the stride-4 and -8 stages, where ``with_cp``'s peak is (docs/benchmarks.md,
#: "GroupMixFormer-M's with_cp"). Kept there, the wide maps of the early stages would
#: raise that peak (base, stage 1: about 2 GB at 800x1216).
KEEP_PRODUCTS_FROM_STAGE = 2


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def zero_outside(x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Zero ``x`` outside the valid region, so a conv sees what its own zero padding gives.

    Args:
        x: ``(B, C, H, W)``.
        valid: ``(B, 1, H, W)`` bool, or None (no-op).
    """
    return x if valid is None else x.masked_fill(~valid, 0.)


def channels_last_kernel(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``(C_out, C_in, k, k)`` with channels-last strides, so that a conv of a
    channels-last map (a view of tokens) runs channels-last, without copying the map.

    A kernel assembled at forward time (repeated, padded, concatenated) is contiguous;
    PyTorch then runs a depthwise conv NCHW and copies the map in and out. (``contiguous``
    would not do: for ``C_in = 1`` contiguous strides already count as channels-last.)
    """
    if torch.onnx.is_in_onnx_export():  # ONNX has no memory formats (and the exporter loses
        return weight                   # the shape of a cloned kernel)
    return weight.clone(memory_format=torch.channels_last)  # (C_out, C_in, k, k)


def frozen_bn_affine(norm: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(scale, shift)`` with ``norm(x) == scale * x + shift`` per channel, when ``norm``
    is a BatchNorm that normalises with its running statistics (eval mode, or
    ``norm_eval``); None otherwise (batch statistics, or another kind of norm)."""
    if not isinstance(norm, _BatchNorm) or norm.training or norm.running_mean is None:
        return None
    scale = torch.rsqrt(norm.running_var + norm.eps)  # (C, )
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def centre_tap(weight: torch.Tensor) -> torch.Tensor:
    """The identity as a depthwise kernel shaped like ``weight`` ``(C, 1, k, k)``: 1 at the
    centre, 0 elsewhere (built from ``weight``'s shape, so that tracers and ONNX know it)."""
    eye = torch.zeros_like(weight)  # (C, 1, k, k)
    eye[:, :, weight.shape[-2] // 2, weight.shape[-1] // 2] = 1
    return eye


ValidSizes = Optional[Tuple[Tuple[int, int], ...]]


def valid_mask(valid_sizes: ValidSizes, stride: int, hw: Sequence[int],
               device: torch.device) -> Optional[torch.Tensor]:
    """Where a map of the network holds image content, from each image's valid size.

    Every conv here is ``k x k`` with padding ``k // 2``: output ``i`` is centred on input
    ``s * i``, so a conv of stride ``s`` keeps ``ceil(h / s)`` valid rows of ``h``, and a
    chain of them of total stride ``stride`` keeps ``ceil(h / stride)``.

    Args:
        valid_sizes: per image, ``(h, w)`` of the content at the top-left of the input; None
            when nothing is padded.
        stride: the map's stride relative to the input.
        hw: the map's ``(H, W)``.

    Returns:
        ``(B, 1, H, W)`` bool, or None.
    """
    if valid_sizes is None:
        return None
    H, W = hw
    heights = torch.tensor([-(-h // stride) for h, _ in valid_sizes], device=device)  # (B, )
    widths = torch.tensor([-(-w // stride) for _, w in valid_sizes], device=device)  # (B, )
    rows = torch.arange(H, device=device)[None, :, None] < heights[:, None, None]  # (B, H, 1)
    cols = torch.arange(W, device=device)[None, None, :] < widths[:, None, None]  # (B, 1, W)
    return (rows & cols)[:, None]  # (B, 1, H, W)


def factorized_attention(q: torch.Tensor,
                         k: torch.Tensor,
                         v: torch.Tensor,
                         num_heads: int,
                         scale: float,
                         key_mask: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Factorised (linear) attention, CoaT style: ``scale * q (softmax_N(k)^T v) + bias``
    per head, on channels-first tokens.

    The softmax runs over the **tokens** (per head and channel), not over the keys of a
    query, so the context ``softmax_N(k)^T v`` is a ``(d, d)`` matrix per head and the
    cost is linear in ``N``: no ``(N, N)`` matrix exists. That is also why this attention
    has no fused ``F.scaled_dot_product_attention`` path (SDPA computes the softmax over
    keys per query); this explicit path is the only one, and is kept lean:

    * channels first, ``(B, h*d, N)``: the softmax runs along contiguous memory and both
      matmuls are long-``N`` GEMMs whatever ``d`` is;
    * the heads share one ``(h*d, h*d)`` context GEMM whose cross-head entries are zeroed
      (exactly: they then add ``q * 0``), which costs ``h`` times the per-head context, so
      call it with few heads (GroupMixFormer calls it with the 2 heads of a segment);
    * the scale and ``bias`` are fused into the last matmul (``torch.baddbmm``).

    Args:
        q, k, v: ``(B, h*d, N)``, channel ``head * d + j``.
        num_heads: h.
        scale: multiplier of ``q @ context`` (applied after the product, as the official
            model does).
        key_mask: optional bool, broadcastable to ``(B, h*d, N)`` (usually ``(B, 1, N)``);
            False tokens get zero softmax weight. Every image needs at least one True token.
        bias: optional ``(B, h*d, N)`` added to the result (GroupMixFormer's CRPE).

    Returns:
        ``(B, h*d, N)``.
    """
    B, C, N = q.shape
    if key_mask is not None:
        k = k.masked_fill(~key_mask, float('-inf'))
    weights = k.softmax(dim=-1)  # (B, C, N), each channel sums to 1 over the tokens
    context = weights @ v.transpose(1, 2)  # (B, C, C), [key channel, value channel]
    head_dims = C // num_heads
    head = torch.arange(C, device=q.device) // head_dims  # (C, ) the head of each channel
    same_head = head[:, None] == head[None, :]  # (C, C), block diagonal
    context = context.masked_fill(~same_head, 0.).transpose(1, 2)  # (B, C, C), [value, key]
    if bias is None:
        return torch.bmm(context, q) * scale  # (B, C, N)
    return torch.baddbmm(bias, context, q, alpha=scale)  # (B, C, N)


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------
class SeparableConv2d(nn.Module):
    """Depthwise ``k x k`` conv (``same`` padding, optional stride) then pointwise ``1x1``;
    neither has a bias.

    Args:
        in_channels / out_channels: channels in and out.
        kernel_size: depthwise kernel k (odd).
        stride: depthwise stride; the output has ``ceil(H / stride)`` rows.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, stride,
                                   padding=kernel_size // 2, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, ceil(H / stride), ceil(W / stride))``.

        The pointwise conv runs as a matmul on the tokens (the same weights): PyTorch runs a
        ``1x1`` conv of a channels-last map on its slow path.
        """
        x = self.depthwise(x)  # (B, C_in, H', W')
        tokens = F.linear(nchw_to_nlc(x), self.pointwise.weight.flatten(1))  # (B, H'*W', C_out)
        return nlc_to_nchw(tokens, x.shape[-2:])  # (B, C_out, H', W')


def conv_norm_act(conv: nn.Module, channels: int, norm_cfg: dict,
                  act_cfg: dict) -> nn.Sequential:
    """``conv -> norm -> act`` with the submodule names ``conv``, ``norm``, ``act``."""
    return nn.Sequential(OrderedDict(conv=conv, norm=build_norm_layer(norm_cfg, channels)[1],
                                     act=build_activation_layer(act_cfg)))


class ConvStem(nn.Module):
    """Stride-4 stem: two ``3x3`` stride-2 convs (with bias), each followed by norm and act.

    Args:
        in_channels: image channels.
        mid_channels: channels after the first conv.
        out_channels: channels of the stride-4 map.
        norm_cfg / act_cfg: norm and activation after each conv.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, norm_cfg: dict,
                 act_cfg: dict) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, stride=2, padding=1)
        self.norm1 = build_norm_layer(norm_cfg, mid_channels)[1]
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, stride=2, padding=1)
        self.norm2 = build_norm_layer(norm_cfg, out_channels)[1]
        self.act = build_activation_layer(act_cfg)

    def forward(self, x: torch.Tensor, valid_sizes: ValidSizes = None) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, C, ceil(H / 4), ceil(W / 4))``; ``valid_sizes``: see
        :func:`valid_mask`."""
        x = zero_outside(x, valid_mask(valid_sizes, 1, x.shape[-2:], x.device))
        x = self.act(self.norm1(self.conv1(x)))
        x = zero_outside(x, valid_mask(valid_sizes, 2, x.shape[-2:], x.device))
        return self.act(self.norm2(self.conv2(x)))


class SeparablePatchEmbed(nn.Module):
    """A stage's entry: separable ``3x3`` conv (stride 1 in stage 0, else 2), norm, act.

    Args:
        in_channels / out_channels: channels in and out.
        stride: 1 or 2.
        norm_cfg / act_cfg: norm and activation after the conv.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm_cfg: dict,
                 act_cfg: dict) -> None:
        super().__init__()
        self.stride = stride
        self.proj = SeparableConv2d(in_channels, out_channels, 3, stride)
        self.norm = build_norm_layer(norm_cfg, out_channels)[1]
        self.act = build_activation_layer(act_cfg)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, ceil(H / s), ceil(W / s))``; ``valid``:
        ``(B, 1, H, W)`` bool or None, zeros outside it.

        The size is the conv's real output size (the official code reports
        ``floor(H / s)`` and fails when that differs).
        """
        return self.act(self.norm(self.proj(zero_outside(x, valid))))


class GroupAggregator(nn.Module):
    """The attention segments of q, k and v at their granularities (paper Sec. 3.2).

    Segment 0 stays token level (norm and act only); segment ``1 + i`` becomes group
    proxies through a separable conv of kernel ``kernel_sizes[i]``, then norm and act.
    q, k and v share every conv and norm of a segment (and, in training mode, BatchNorm's
    batch statistics), as in the official model, which stacks them on the batch axis.

    It runs one segment at a time (:meth:`forward`), so that the attention of a segment
    can follow while its maps are still in cache.

    Args:
        segment_dims: channels per segment.
        kernel_sizes: kernel of each proxy segment.
        norm_cfg / act_cfg: norm and activation of every segment.
    """

    def __init__(self, segment_dims: int, kernel_sizes: Sequence[int], norm_cfg: dict,
                 act_cfg: dict) -> None:
        super().__init__()
        self.segment_dims = segment_dims
        self.token_branch = nn.Sequential(
            OrderedDict(norm=build_norm_layer(norm_cfg, segment_dims)[1],
                        act=build_activation_layer(act_cfg)))
        self.proxy_branches = nn.ModuleList([
            conv_norm_act(SeparableConv2d(segment_dims, segment_dims, k), segment_dims,
                          norm_cfg, act_cfg) for k in kernel_sizes
        ])

    def forward(self, qkv: torch.Tensor, segment: int, hw: Tuple[int, int]) -> torch.Tensor:
        """Segment ``segment`` (0: token level, ``1 + i``: proxy ``i``) of q, k and v.

        Args:
            qkv: ``(B, N, 3 * s)`` tokens, channels ``[q | k | v]`` of the segment.
            segment: which segment.
            hw: the map size ``(H, W)``.

        Returns:
            ``(3, B, s, N)``: q, k and v channels first.
        """
        B, N, _ = qkv.shape
        s = self.segment_dims
        if segment == 0:
            branch = self.token_branch
            stacked = qkv.view(B, N, 3, s).permute(2, 0, 3, 1)  # (3, B, s, N)
        else:
            branch = self.proxy_branches[segment - 1]
            depthwise, pointwise = branch.conv.depthwise, branch.conv.pointwise
            # One depthwise conv over [q | k | v] (channels-last, as oneDNN runs depthwise
            # convs fastest), the shared kernel repeated for each of them.
            kernel = channels_last_kernel(depthwise.weight.repeat(3, 1, 1, 1))  # (3s, 1, k, k)
            proxies = depthwise_conv2d(nlc_to_nchw(qkv, hw), kernel,
                                       kernel_size=depthwise.kernel_size[0])  # (B, 3s, H, W)
            proxies = nchw_to_nlc(proxies).view(B, N, 3, s)  # (B, N, 3, s)
            # The pointwise conv as a batched matmul that also turns the tokens channels
            # first (a 1x1 conv, or a matmul on the tokens, of so few channels is slow).
            proxies = proxies.permute(2, 0, 3, 1).reshape(3 * B, s, N)  # (3B, s, N)
            weight = pointwise.weight.flatten(1)  # (s, s)
            affine = frozen_bn_affine(branch.norm)
            if affine is not None:  # a per-channel affine: folded into the matmul
                scale, shift = affine
                maps = torch.baddbmm(shift[:, None], (scale[:, None] * weight).expand(
                    3 * B, s, s), proxies)  # (3B, s, N)
                return branch.act(maps).view(3, B, s, N)  # (3, B, s, N)
            stacked = torch.bmm(weight.expand(3 * B, s, s), proxies)  # (3B, s, N)
        maps = stacked.reshape(3 * B, s, *hw)  # (3B, s, H, W): q, k, v on the batch axis
        return branch.act(branch.norm(maps)).view(3, B, s, N)  # (3, B, s, N)


class LocalBranch(nn.Module):
    """The non-attention segment: separable conv over its ``[q | k | v]`` slices, then
    LayerNorm (eps 1e-5, as the official model) per token and act.

    Args:
        segment_dims: channels s of the segment (input ``3 s``, output ``s``).
        kernel_size: kernel of the separable conv.
        act_cfg: activation.
    """

    def __init__(self, segment_dims: int, kernel_size: int, act_cfg: dict) -> None:
        super().__init__()
        self.conv = SeparableConv2d(3 * segment_dims, segment_dims, kernel_size)
        self.norm = nn.LayerNorm(segment_dims, eps=1e-5)
        self.act = build_activation_layer(act_cfg)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """Tokens ``(B, H*W, 3s)`` -> tokens ``(B, H*W, s)``.

        The pointwise conv runs as a matmul on the tokens (the same weights): a ``1x1``
        conv of few channels is slow on CPU.
        """
        x = nchw_to_nlc(self.conv.depthwise(nlc_to_nchw(x, hw)))  # (B, N, 3s)
        x = F.linear(x, self.conv.pointwise.weight.flatten(1))  # (B, N, s)
        return self.act(self.norm(x))


class ConvRelPosEnc(nn.Module):
    """Convolutional relative position encoding (CoaT): ``q * dwconv(v)`` per head group.

    Args:
        head_dims: channels per head d.
        windows: ``(kernel size, heads)`` per group, in head order; heads must add up to
            the attention's heads.
    """

    def __init__(self, head_dims: int, windows: Sequence[Tuple[int, int]]) -> None:
        super().__init__()
        self.head_dims = head_dims
        self.channel_splits = [heads * head_dims for _, heads in windows]
        self.convs = nn.ModuleList([
            nn.Conv2d(c, c, k, padding=k // 2, groups=c)
            for (k, _), c in zip(windows, self.channel_splits)
        ])
        #: for each head: (index of its conv, the head's first channel in that conv)
        self.head_convs = [(i, j * head_dims) for i, (_, heads) in enumerate(windows)
                           for j in range(heads)]

    def kernels(self, heads: range) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """The depthwise kernels and biases of consecutive ``heads``, the smaller kernels
        zero-padded (centred) to the largest: one conv then equals each head's own conv.

        Returns:
            weight ``(len(heads) * d, 1, k, k)``, bias ``(len(heads) * d, )`` and ``k`` as a
            Python int (a traced ``weight.shape`` is a tensor, which torch 2.1's tracer
            cannot pass as a conv's padding).
        """
        d = self.head_dims
        convs = [(self.convs[i], start) for i, start in (self.head_convs[h] for h in heads)]
        size = max(conv.kernel_size[0] for conv, _ in convs)
        # Written into zeros of a known shape (not padded and concatenated), so that tracers
        # and the ONNX exporter know the kernel's shape.
        weight = convs[0][0].weight.new_zeros(len(convs) * d, 1, size, size)
        for n, (conv, start) in enumerate(convs):
            k = conv.kernel_size[0]
            pad = (size - k) // 2
            weight[n * d:(n + 1) * d, :, pad:pad + k, pad:pad + k] = conv.weight[start:start + d]
        bias = torch.cat([conv.bias[start:start + d] for conv, start in convs])  # (n * d, )
        return channels_last_kernel(weight), bias, size

    def forward(self, q: torch.Tensor, v: torch.Tensor, heads: range, hw: Tuple[int, int],
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The encoding of consecutive ``heads``: ``q, v: (B, len(heads) * d, N)``
        channels first -> ``(B, len(heads) * d, N)``; ``valid``: ``(B, 1, H, W)`` or None.
        """
        B, C, N = v.shape
        weight, bias, size = self.kernels(heads)
        # Channels-last, as oneDNN runs depthwise convs fastest.
        v = v.reshape(B, C, *hw).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
        v = depthwise_conv2d(zero_outside(v, valid), weight, bias,
                             kernel_size=size)  # (B, C, H, W)
        return q * v.flatten(2)  # (B, C, N)


class GroupMixAttention(nn.Module):
    """Group-Mix Attention (paper Sec. 3.2), ``EfficientAtt`` in the official code.

    With ``S = NUM_SEGMENTS`` (5) segments of ``s = D / S`` channels, the
    attention part has ``C' = (S - 1) s`` channels and ``num_heads`` heads of
    ``d = C' / num_heads`` channels; heads take contiguous channels, so with 8 heads and
    4 attention segments heads 0-1 see tokens, 2-3 the 3x3 proxies, and so on.

    1. ``qkv`` (Linear D -> 3D);
    2. attention segments through :class:`GroupAggregator`, the last segment through
       :class:`LocalBranch`;
    3. ``y = scale * q (softmax_N(k)^T v) + crpe(q, v)`` (:func:`factorized_attention`),
       with ``scale = (D // num_heads) ** -0.5``: the official model scales by the width
       of ``D`` split over the heads, not by ``d`` (for the mini stage 0, ``5 ** -0.5``
       while ``d = 4``);
    4. ``proj(concat(y, local))``.

    The forward runs segment by segment: no head sees two segments, so a segment's
    aggregation, attention and CRPE need no other segment's maps (the CRPE, which groups
    the heads differently, gets each segment's heads' kernels, see
    :meth:`ConvRelPosEnc.kernels`). The ``qkv`` rows are reordered on the fly so that each
    segment's q, k and v come out side by side; the parameters are the official ones.

    Args:
        embed_dims: channels D (a multiple of S, and ``C'`` of ``num_heads``).
        num_heads: heads of the factorised attention.
        norm_cfg / act_cfg: norm and activation of the aggregator (and act of the local
            branch).

    The kernels of the proxies and the local branch, the CRPE windows and the ``qkv``
    bias are the official model's, constants of this module (every official variant has
    the same).
    """

    def __init__(self, embed_dims: int, num_heads: int, norm_cfg: dict, act_cfg: dict,
                 keep_products: bool = False) -> None:
        super().__init__()
        num_segments = NUM_SEGMENTS
        if embed_dims % num_segments:
            raise ValueError(
                f'GroupMixAttention: embed_dims {embed_dims} must be divisible by '
                f'{num_segments} (one segment each for the token level, the '
                f'{len(PROXY_KERNEL_SIZES)} group proxies {PROXY_KERNEL_SIZES} and the '
                f'local branch)')
        self.segment_dims = embed_dims // num_segments
        self.attn_dims = self.segment_dims * (num_segments - 1)
        if self.attn_dims % num_heads:
            raise ValueError(
                f'GroupMixAttention: the attention part of embed_dims {embed_dims} '
                f'({num_segments - 1} of {num_segments} segments = {self.attn_dims} channels) '
                f'must be divisible by num_heads {num_heads}; embed_dims must be a multiple of '
                f'{num_segments * num_heads // math.gcd(num_segments - 1, num_heads)}')
        crpe_heads = sum(heads for _, heads in CRPE_WINDOWS)
        if crpe_heads != num_heads:
            raise ValueError(f'GroupMixAttention: the CRPE windows {CRPE_WINDOWS} cover '
                             f'{crpe_heads} heads, but num_heads is {num_heads}')
        self.num_heads = num_heads
        self.head_dims = self.attn_dims // num_heads
        # num_heads is the CRPE's 8 and C' holds 4 segments: whole heads per segment.
        self.heads_per_segment = num_heads // (num_segments - 1)
        self.scale = (embed_dims // num_heads)**-0.5
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims)
        self.aggregator = GroupAggregator(self.segment_dims, PROXY_KERNEL_SIZES, norm_cfg,
                                          act_cfg)
        self.local_branch = LocalBranch(self.segment_dims, LOCAL_KERNEL_SIZE, act_cfg)
        self.crpe = ConvRelPosEnc(self.head_dims, CRPE_WINDOWS)
        self.proj = nn.Linear(embed_dims, embed_dims)
        #: ``with_cp`` keeps the ``qkv`` products (see :data:`KEEP_PRODUCTS_FROM_STAGE`)
        self.keep_products = keep_products

    def forward(self, x: torch.Tensor, hw: Tuple[int, int],
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens ``(B, H*W, D)`` -> ``(B, H*W, D)``.

        Args:
            x: normalised tokens, row-major.
            hw: the map size ``(H, W)``.
            valid: ``(B, 1, H, W)`` bool, or None; see :class:`GroupMixFormer`.
        """
        B, N, D = x.shape
        s, S = self.segment_dims, NUM_SEGMENTS
        # The qkv rows of each segment, [q | k | v]: one dense GEMM output per segment
        # (no strided slices to copy for the convs), computed when the segment is needed.
        weights = self.qkv.weight.view(3, S, s, D).unbind(1)  # S x (3, s, D)
        biases = self.qkv.bias.view(3, S, s).unbind(1)  # S x (3, s)
        token_mask = None if valid is None else ~valid.view(B, N, 1)  # (B, N, 1)
        linear = kept_linear if self.keep_products else F.linear

        def project(segment: int) -> torch.Tensor:  # (B, N, 3s), channels [q | k | v]
            # (3, s, D) -> (3s, D) weight rows and (3, s) -> (3s,) bias: [q | k | v] of the segment
            qkv = linear(x, weights[segment].reshape(3 * s, D), biases[segment].flatten())
            # The aggregator's convs must see zeros outside.
            return qkv if token_mask is None else qkv.masked_fill(token_mask, 0.)

        key_mask = None if valid is None else valid.view(B, 1, N)  # (B, 1, N)
        heads = self.heads_per_segment
        outs = []
        for i in range(S - 1):
            q, k, v = self.aggregator(project(i), i, hw).unbind(0)  # each (B, s, N)
            crpe = self.crpe(q, v, range(i * heads, (i + 1) * heads), hw, valid)  # (B, s, N)
            y = factorized_attention(q, k, v, heads, self.scale, key_mask=key_mask,
                                     bias=crpe)  # (B, s, N)
            outs.append(y)
        outs.append(self.local_branch(project(S - 1), hw).transpose(1, 2))  # (B, s, N)
        # Concatenated channels first (contiguous copies); proj reads it transposed.
        return self.proj(torch.cat(outs, dim=1).transpose(1, 2))  # (B, N, D)


class Mlp(nn.Module):
    """Token MLP: ``fc2(act(fc1(x)))``, ``D -> hidden -> D``."""

    def __init__(self, embed_dims: int, hidden_dims: int, act_cfg: dict,
                 keep_products: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.act = build_activation_layer(act_cfg)
        self.fc2 = nn.Linear(hidden_dims, embed_dims)
        #: ``with_cp`` keeps the ``fc1`` products (see :data:`KEEP_PRODUCTS_FROM_STAGE`; not
        #: under an in-place activation, which would overwrite them)
        self.keep_products = keep_products and not getattr(self.act, 'inplace', False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, N, D)``."""
        if self.keep_products:
            return self.fc2(self.act(kept_linear(x, self.fc1.weight, self.fc1.bias)))
        return self.fc2(self.act(self.fc1(x)))


class GroupMixBlock(nn.Module):
    """One block (``GMA_Block``):

    1. ``x <- x + dwconv3x3(x)`` (convolutional position encoding, ``cpe``);
    2. ``x <- x + DropPath(attn(norm1(x)))``;
    3. ``x <- x + DropPath(ffn(norm2(x)))``.

    Args:
        embed_dims: channels D.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP over D.
        drop_path: stochastic depth rate of both residual branches.
        norm_cfg / act_cfg: norm and activation of the attention's convolutions.
        ffn_act_cfg: activation of the MLP.
        keep_products: ``with_cp`` keeps the ``qkv`` and ``fc1`` products (see
            :data:`KEEP_PRODUCTS_FROM_STAGE`).
    """

    def __init__(self, embed_dims: int, num_heads: int, mlp_ratio: float,
                 drop_path_rate: float, norm_cfg: dict, act_cfg: dict,
                 ffn_act_cfg: dict, keep_products: bool = False) -> None:
        super().__init__()
        self.cpe = nn.Conv2d(embed_dims, embed_dims, 3, padding=1, groups=embed_dims)
        self.norm1 = nn.LayerNorm(embed_dims, eps=1e-6)
        self.attn = GroupMixAttention(embed_dims, num_heads, norm_cfg, act_cfg, keep_products)
        self.norm2 = nn.LayerNorm(embed_dims, eps=1e-6)
        self.ffn = Mlp(embed_dims, int(embed_dims * mlp_ratio), ffn_act_cfg, keep_products)
        self.drop_path = drop_path(drop_path_rate)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int],
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens ``(B, H*W, D)`` -> ``(B, H*W, D)``; ``valid``: ``(B, 1, H, W)`` or None."""
        # x + dwconv(x) as one depthwise conv: its kernel with 1 added at the centre.
        weight = self.cpe.weight + centre_tap(self.cpe.weight)  # (D, 1, 3, 3)
        x = F.conv2d(zero_outside(nlc_to_nchw(x, hw), valid), channels_last_kernel(weight),
                     self.cpe.bias, padding=self.cpe.padding, groups=self.cpe.groups)
        x = nchw_to_nlc(x)  # (B, N, D)
        x = x + self.drop_path(self.attn(self.norm1(x), hw, valid))
        if self.training or torch.is_grad_enabled() or torch.jit.is_tracing():
            # (a trace would not see the in-place updates of the chunks below)
            return x + self.drop_path(self.ffn(self.norm2(x)))
        # Inference: the FFN is per token, so it runs on chunks of tokens added in place;
        # its hidden activations (4x the tokens) then stay in cache and take no fresh memory.
        chunk = max(1, FFN_CHUNK_ELEMENTS // self.ffn.fc1.out_features)
        for tokens in x.split(chunk, dim=1):  # each (B, chunk, D), a view of x
            tokens += self.ffn(self.norm2(tokens))
        return x


class GroupMixStage(PyramidStage):
    """One stage: its patch embedding, then its blocks on tokens.

    Args:
        patch_embed: the entry, of stride ``entry_stride``.
        blocks: the blocks.
        stride: the stage's output stride relative to the image (4, 8, ...).
        entry_stride: the patch embedding's stride.
    """

    def __init__(self, patch_embed: SeparablePatchEmbed, blocks: List[GroupMixBlock],
                 stride: int, entry_stride: int) -> None:
        super().__init__(patch_embed, blocks)
        self.stride = stride
        self.entry_stride = entry_stride

    def forward(self, x: torch.Tensor, valid_sizes: ValidSizes = None) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C, ceil(H / s), ceil(W / s))``, ``s = entry_stride``;
        ``valid_sizes``: see :func:`valid_mask`."""
        entry_valid = valid_mask(valid_sizes, self.stride // self.entry_stride, x.shape[-2:],
                                 x.device)
        x = self.run(self.patch_embed, x, entry_valid)  # (B, C, H_i, W_i)
        hw = tuple(x.shape[-2:])
        valid = valid_mask(valid_sizes, self.stride, hw, x.device)  # (B, 1, H_i, W_i) or None
        tokens = self.run_blocks(nchw_to_nlc(x), hw, valid)  # (B, H_i*W_i, C)
        return nlc_to_nchw(tokens, hw)  # (B, C, H_i, W_i)


# ---------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------
@MODELS.register_module()
class GroupMixFormer(PyramidBackbone):
    """GroupMixFormer backbone: conv stem, then four stages of (patch embedding, Group-Mix
    blocks).

    Outputs are the maps after the last block of each stage, with no extra norm (the
    official ``forward_features`` with ``return_interm_layers=True``): strides 4, 8, 16,
    32 and ``out_channels = embed_dims[i]`` for ``i in out_indices``.

    **Any input size** ``>= 32``: stage sizes are the convs' real output sizes,
    ``H_1 = ceil(ceil(H / 2) / 2)``, ``H_{i+1} = ceil(H_i / 2)``. At multiples of 32 (the
    only sizes the official model accepts) they equal the official sizes and the outputs
    equal the official outputs.

    **Padding.** Without ``valid_sizes``, zero padding (mmdet's batch padding, or the
    caller's) is computed on like image content: the token softmax of every attention
    runs over all tokens, so outputs at valid positions change, increasingly in deeper
    stages, as they do in the official model (and in mmdet's Swin/PVT). With
    ``forward(x, valid_sizes=...)`` giving each image's un-padded ``(h, w)`` at the
    top-left (mmdet's ``data_sample.img_shape``), the padded tokens get zero softmax
    weight and are re-zeroed before every spatial conv (stem, patch embeddings, ``cpe``,
    aggregator, local branch, CRPE), so in **eval mode** the outputs at valid positions
    are those of the un-padded image alone (equal up to float rounding, ~1e-6 relative).
    Not invariant: in **training mode** BatchNorm's batch statistics include the padded
    positions (``norm_eval=True`` removes that); values *at* padded positions are
    unspecified. mmdet's detectors call ``backbone(inputs)`` without ``valid_sizes``, so
    using it takes a detector or data preprocessor that passes the sizes.

    Args:
        arch: ``'mini'`` (the paper's M, official ``groupmixformer_miny.yaml``), ``'tiny'``,
            ``'small'``, ``'base'``, ``'large'``, or a dict with the keys of ``arch_zoo``.
        ffn_act_cfg: activation of the MLPs (default GELU).
        **kwargs: the arguments of :class:`PyramidBackbone`. ``norm_cfg`` is the norm of the
            stem, the patch embeddings and the aggregator (default BN; the official code
            hard-codes SyncBN, which configs for multi-GPU training set; the block norms are
            LayerNorms, as in the official model), ``act_cfg`` the activation after those
            norms (default Hardswish). The official ImageNet training used
            ``drop_path_rate`` 0.1 / 0.1 / 0.2 / 0.5 / 0.1 for mini / tiny / small / base /
            large.

    Input: ``(B, 3, H, W)``; output: tuple of ``(B, C_i, H_i, W_i)``.
    """
    publication = Publication(  # paper, official code at the commit read, checkpoints
        'GroupMixFormer', 'Advancing Vision Transformers with Group-Mix Attention', 'arXiv 2023', 'https://arxiv.org/abs/2311.15157',  # noqa: E501
        code='https://github.com/AILab-CVC/GroupMixFormer/blob/3d3f40977c6aa9f5d9eb3d6ffb53cc9c648cf7b2/models/groupmixformer.py',  # noqa: E501
        published='OneDrive folders linked in the AILab-CVC/GroupMixFormer README (it links the mini folder for large too); no direct URL: download by hand to the path the config names',  # noqa: E501
        imagenet_top1={'mini': 79.6, 'tiny': 82.6, 'small': 83.4, 'base': 84.7, 'large': 85.0},
        imagenet_top5={'small': 96.464},
        imagenet_source='AILab-CVC/GroupMixFormer README, Model Zoo "acc@1" (224x224); top-5 of small: its evaluation example ("Acc@5 96.464")')  # noqa: E501
    arch_zoo = {
        # The official configs/groupmixformer_{miny,tiny,small,base,large}.yaml; 8 heads and
        # qkv bias everywhere (config.py). stem_channels: the stem's first conv (D0 / 2).
        'mini':  dict(embed_dims=(40, 80, 160, 160),   depths=(3, 3, 12, 4),   num_heads=(8, 8, 8, 8), mlp_ratios=(4, 4, 4, 4), stem_channels=20),   # noqa: E501
        'tiny':  dict(embed_dims=(80, 160, 200, 240),  depths=(4, 4, 12, 4),   num_heads=(8, 8, 8, 8), mlp_ratios=(4, 4, 4, 4), stem_channels=40),   # noqa: E501
        'small': dict(embed_dims=(80, 160, 320, 320),  depths=(2, 4, 12, 4),   num_heads=(8, 8, 8, 8), mlp_ratios=(4, 4, 4, 4), stem_channels=40),   # noqa: E501
        'base':  dict(embed_dims=(200, 240, 320, 480), depths=(8, 8, 12, 8),   num_heads=(8, 8, 8, 8), mlp_ratios=(2, 2, 4, 4), stem_channels=100),  # noqa: E501
        'large': dict(embed_dims=(240, 320, 360, 480), depths=(8, 10, 30, 10), num_heads=(8, 8, 8, 8), mlp_ratios=(4, 4, 2, 2), stem_channels=120),  # noqa: E501
    }

    smallest_arch, base_size_arch = 'mini', 'base'
    cp_keeps_products = True  # qkv and fc1 of stages 3-4 (KEEP_PRODUCTS_FROM_STAGE)
    depthwise_kernels = True  # the proxies' and the CRPE's 5x5 / 7x7 kernels
    default_act_cfg = dict(type='HSwish')
    reference_name = 'groupmixformer'
    position_encoding_keys = ('.cpe.', '.crpe.')  # the convolutional (relative) position encodings

    def __init__(self, arch: Union[str, dict, None] = None, *,
                 ffn_act_cfg: dict = dict(type='GELU'), **kwargs) -> None:
        self.ffn_act_cfg = dict(ffn_act_cfg)
        super().__init__(arch, **kwargs)

    def build_stem(self) -> ConvStem:
        return ConvStem(self.in_channels, self.arch_settings['stem_channels'],
                        self.arch_settings['embed_dims'][0], self.norm_cfg, self.act_cfg)

    def build_stage(self, i: int, drop_path_rates: List[float]) -> GroupMixStage:
        s, dims = self.arch_settings, self.arch_settings['embed_dims']
        entry_stride = 1 if i == 0 else 2  # stage 0 keeps the stem's stride 4
        patch_embed = SeparablePatchEmbed(dims[max(i - 1, 0)], dims[i], entry_stride,
                                          self.norm_cfg, self.act_cfg)
        blocks = [
            GroupMixBlock(dims[i], s['num_heads'][i], s['mlp_ratios'][i], rate, self.norm_cfg,
                          self.act_cfg, self.ffn_act_cfg, i >= KEEP_PRODUCTS_FROM_STAGE)
            for rate in drop_path_rates
        ]
        return GroupMixStage(patch_embed, blocks, stride=4 * 2**i, entry_stride=entry_stride)

    def forward_extras(self, x: torch.Tensor,
                       valid_sizes: Optional[Sequence[Tuple[int, int]]] = None
                       ) -> Dict[str, Any]:
        """``forward(x, valid_sizes=...)``: optional per-image ``(h, w)`` of the content at
        the top-left of ``x`` (the rest is padding); see the class docstring. Checked here;
        nothing is passed on when there is nothing to mask."""
        if valid_sizes is None:
            return {}
        B, _, H, W = x.shape
        sizes = tuple((int(size[0]), int(size[1])) for size in valid_sizes)
        if len(sizes) != B:
            raise ValueError(f'valid_sizes has {len(sizes)} entries for a batch of {B}')
        bad = [size for size in sizes if not (1 <= size[0] <= H and 1 <= size[1] <= W)]
        if bad:
            raise ValueError(f'valid_sizes {bad} do not fit inputs of {H}x{W}')
        if all(size == (H, W) for size in sizes):
            return {}
        return dict(valid_sizes=sizes)

    def init_default_weights(self) -> None:
        """Official init: truncated normal (std 0.02) Linear weights with zero biases,
        LayerNorms 1/0; convolutions and BatchNorms keep PyTorch's defaults."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # Official groupmixformer.py key -> mmhat key (applied in order to every key).
    official_rename_rules = [
        (r'^conv_stem\.proj([12])\.', r'stem.conv\1.'),
        (r'^conv_stem\.norm([12])\.', r'stem.norm\1.'),
        (r'^patch_embed_layers\.(\d+)\.', r'stages.\1.patch_embed.'),
        (r'^groupmixformer_backbone\.(\d+)\.gma_stage\.(\d+)\.', r'stages.\1.blocks.\2.'),
        (r'\.proj\.conv1\.', '.proj.depthwise.'),
        (r'\.proj\.pointwise_conv\.', '.proj.pointwise.'),
        (r'\.cpe\.proj\.', '.cpe.'),
        (r'\.att\.aggregator\.norm0\.', '.attn.aggregator.token_branch.norm.'),
        (r'\.att\.aggregator\.agg([1-9])\.conv1\.',
         lambda m: f'.attn.aggregator.proxy_branches.{int(m[1]) - 1}.conv.depthwise.'),
        (r'\.att\.aggregator\.agg([1-9])\.pointwise_conv\.',
         lambda m: f'.attn.aggregator.proxy_branches.{int(m[1]) - 1}.conv.pointwise.'),
        (r'\.att\.aggregator\.norm([1-9])\.',
         lambda m: f'.attn.aggregator.proxy_branches.{int(m[1]) - 1}.norm.'),
        (r'\.att\.aggregator\.agg0\.conv\.conv1\.', '.attn.local_branch.conv.depthwise.'),
        (r'\.att\.aggregator\.agg0\.conv\.pointwise_conv\.', '.attn.local_branch.conv.pointwise.'),
        (r'\.att\.aggregator\.agg0\.norm\.', '.attn.local_branch.norm.'),
        (r'\.att\.crpe\.conv_list\.', '.attn.crpe.convs.'),
        (r'\.att\.', '.attn.'),
        (r'\.mlp\.', '.ffn.'),
    ]
    official_drop_rules = [
        (r'^head\.', 'classification head'),
        (r'^norm4\.', 'classification-only norm before pooling'),
    ]
    # The official classifier (BatchNorm `norm4`, mean over H and W, Linear) ->
    # mmhat.OfficialClsHead's keys.
    official_head_rules = [(r'^norm4\.', 'norm.'), (r'^head\.', 'fc.')]
