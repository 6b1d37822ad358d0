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
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.model.weight_init import trunc_normal_
from torch import nn

from mmhat.registry import MODELS
from ..layers import (drop_path, merge_heads, merge_heads_nchw, nchw_to_nlc, nlc_to_nchw,
                      split_heads_nchw)
from .base import PyramidBackbone, PyramidStage

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
                         scale: float,
                         key_mask: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Factorised (linear) attention, CoaT style: ``scale * q (softmax_N(k)^T v) + bias``.

    The softmax runs over the **tokens** (per head and channel), not over the keys of a
    query, so the context ``softmax_N(k)^T v`` is a ``(d, d)`` matrix per head and the
    cost is linear in ``N``: no ``(N, N)`` matrix exists. That is also why this attention
    has no fused ``F.scaled_dot_product_attention`` path (SDPA computes the softmax over
    keys per query); this explicit path is the only one, and is kept lean: the context is
    formed first (``O(N d^2)``), and the scale and ``bias`` are fused into the last matmul
    (``torch.baddbmm``), so the only ``(N, d)`` temporaries are the softmax and the output.

    Args:
        q, k, v: ``(B, h, N, d)``.
        scale: multiplier of ``q @ context`` (applied after the product, as the official
            model does).
        key_mask: optional bool, broadcastable to ``(B, h, N, d)`` (usually
            ``(B, 1, N, 1)``); False tokens get zero softmax weight. Every image needs at
            least one True token.
        bias: optional ``(B, h, N, d)`` added to the result (GroupMixFormer's CRPE).

    Returns:
        ``(B, h, N, d)``.
    """
    B, h, N, d = q.shape
    if key_mask is not None:
        k = k.masked_fill(~key_mask, float('-inf'))
    weights = k.softmax(dim=-2)  # (B, h, N, d), each channel sums to 1 over the tokens
    context = weights.transpose(-2, -1) @ v  # (B, h, d, d)
    q = q.reshape(B * h, N, d)  # (B*h, N, d)
    context = context.reshape(B * h, d, d)  # (B*h, d, d)
    if bias is None:
        out = torch.bmm(q, context) * scale  # (B*h, N, d)
    else:
        out = torch.baddbmm(bias.reshape(B * h, N, d), q, context, alpha=scale)  # (B*h, N, d)
    return out.view(B, h, N, d)  # (B, h, N, d)


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
        """``(B, C_in, H, W)`` -> ``(B, C_out, ceil(H / stride), ceil(W / stride))``."""
        return self.pointwise(self.depthwise(x))


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
    q, k and v arrive stacked on the batch axis, so they share every conv and norm (and,
    in training mode, BatchNorm's batch statistics), as in the official model.

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(3B, S * s, H, W)`` -> same shape, ``S = 1 + len(kernel_sizes)`` segments."""
        token, *proxies = x.split(self.segment_dims, dim=1)  # each (3B, s, H, W)
        outs = [self.token_branch(token)]
        outs += [branch(seg) for branch, seg in zip(self.proxy_branches, proxies)]
        return torch.cat(outs, dim=1)  # (3B, S * s, H, W)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3s, H, W)`` -> tokens ``(B, H*W, s)``."""
        return self.act(self.norm(nchw_to_nlc(self.conv(x))))


class ConvRelPosEnc(nn.Module):
    """Convolutional relative position encoding (CoaT): ``q * dwconv(v)`` per head group.

    Args:
        head_dims: channels per head d.
        windows: ``(kernel size, heads)`` per group, in head order; heads must add up to
            the attention's heads.
    """

    def __init__(self, head_dims: int, windows: Sequence[Tuple[int, int]]) -> None:
        super().__init__()
        self.channel_splits = [heads * head_dims for _, heads in windows]
        self.convs = nn.ModuleList([
            nn.Conv2d(c, c, k, padding=k // 2, groups=c)
            for (k, _), c in zip(windows, self.channel_splits)
        ])

    def forward(self, q: torch.Tensor, v: torch.Tensor, hw: Tuple[int, int],
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``q, v: (B, h, N, d)`` -> ``(B, h, N, d)``; ``valid``: ``(B, 1, H, W)`` or None."""
        h = v.shape[1]
        v = zero_outside(merge_heads_nchw(v, hw), valid)  # (B, h*d, H, W)
        v = torch.cat([conv(part) for conv, part in
                       zip(self.convs, v.split(self.channel_splits, dim=1))], dim=1)
        return q * split_heads_nchw(v, h)  # (B, h, N, d)


class GroupMixAttention(nn.Module):
    """Group-Mix Attention (paper Sec. 3.2), ``EfficientAtt`` in the official code.

    With ``S = NUM_SEGMENTS`` (5) segments of ``s = D / S`` channels, the
    attention part has ``C' = (S - 1) s`` channels and ``num_heads`` heads of
    ``d = C' / num_heads`` channels; heads take contiguous channels, so with 8 heads and
    4 attention segments heads 0-1 see tokens, 2-3 the 3x3 proxies, and so on.

    1. ``qkv`` (Linear D -> 3D), q/k/v stacked on the batch axis as maps;
    2. attention segments through :class:`GroupAggregator`, the last segment through
       :class:`LocalBranch`;
    3. ``y = scale * q (softmax_N(k)^T v) + crpe(q, v)`` (:func:`factorized_attention`),
       with ``scale = (D // num_heads) ** -0.5``: the official model scales by the width
       of ``D`` split over the heads, not by ``d`` (for the mini stage 0, ``5 ** -0.5``
       while ``d = 4``);
    4. ``proj(concat(y, local))``.

    Args:
        embed_dims: channels D (a multiple of S, and ``C'`` of ``num_heads``).
        num_heads: heads of the factorised attention.
        norm_cfg / act_cfg: norm and activation of the aggregator (and act of the local
            branch).

    The kernels of the proxies and the local branch, the CRPE windows and the ``qkv``
    bias are the official model's, constants of this module (every official variant has
    the same).
    """

    def __init__(self, embed_dims: int, num_heads: int, norm_cfg: dict, act_cfg: dict) -> None:
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
        self.scale = (embed_dims // num_heads)**-0.5
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims)
        self.aggregator = GroupAggregator(self.segment_dims, PROXY_KERNEL_SIZES, norm_cfg,
                                          act_cfg)
        self.local_branch = LocalBranch(self.segment_dims, LOCAL_KERNEL_SIZE, act_cfg)
        self.crpe = ConvRelPosEnc(self.head_dims, CRPE_WINDOWS)
        self.proj = nn.Linear(embed_dims, embed_dims)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int],
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens ``(B, H*W, D)`` -> ``(B, H*W, D)``.

        Args:
            x: normalised tokens, row-major.
            hw: the map size ``(H, W)``.
            valid: ``(B, 1, H, W)`` bool, or None; see :class:`GroupMixFormer`.
        """
        B, N, D = x.shape
        H, W = hw
        qkv = self.qkv(x)  # (B, N, 3D), channels [q | k | v]
        if valid is not None:  # the aggregator's convs must see zeros outside
            qkv = qkv.masked_fill(~valid.flatten(2).transpose(1, 2), 0.)  # mask (B, N, 1)
        qkv = qkv.view(B, N, 3, D).permute(2, 0, 1, 3)  # (3, B, N, D)
        qkv = qkv.reshape(3 * B, N, D).transpose(1, 2).view(3 * B, D, H, W)  # (3B, D, H, W)
        groups, local = qkv.split([self.attn_dims, self.segment_dims], dim=1)

        # Local branch: the last segment of q, k and v side by side per image.
        local = local.reshape(3, B, self.segment_dims, H, W).transpose(0, 1)  # (B, 3, s, H, W)
        local = self.local_branch(local.reshape(B, 3 * self.segment_dims, H, W))  # (B, N, s)

        groups = split_heads_nchw(self.aggregator(groups), self.num_heads)  # (3B, h, N, d)
        q, k, v = groups.unflatten(0, (3, B)).unbind(0)  # each (B, h, N, d)
        key_mask = None if valid is None else valid.reshape(B, 1, N, 1)  # (B, 1, N, 1)
        y = factorized_attention(q, k, v, self.scale, key_mask=key_mask,
                                 bias=self.crpe(q, v, hw, valid))  # (B, h, N, d)
        return self.proj(torch.cat([merge_heads(y), local], dim=-1))  # (B, N, D)


class Mlp(nn.Module):
    """Token MLP: ``fc2(act(fc1(x)))``, ``D -> hidden -> D``."""

    def __init__(self, embed_dims: int, hidden_dims: int, act_cfg: dict) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.act = build_activation_layer(act_cfg)
        self.fc2 = nn.Linear(hidden_dims, embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, N, D)``."""
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
    """

    def __init__(self, embed_dims: int, num_heads: int, mlp_ratio: float,
                 drop_path_rate: float, norm_cfg: dict, act_cfg: dict,
                 ffn_act_cfg: dict) -> None:
        super().__init__()
        self.cpe = nn.Conv2d(embed_dims, embed_dims, 3, padding=1, groups=embed_dims)
        self.norm1 = nn.LayerNorm(embed_dims, eps=1e-6)
        self.attn = GroupMixAttention(embed_dims, num_heads, norm_cfg, act_cfg)
        self.norm2 = nn.LayerNorm(embed_dims, eps=1e-6)
        self.ffn = Mlp(embed_dims, int(embed_dims * mlp_ratio), ffn_act_cfg)
        self.drop_path = drop_path(drop_path_rate)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int],
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens ``(B, H*W, D)`` -> ``(B, H*W, D)``; ``valid``: ``(B, 1, H, W)`` or None."""
        x = x + nchw_to_nlc(self.cpe(zero_outside(nlc_to_nchw(x, hw), valid)))
        x = x + self.drop_path(self.attn(self.norm1(x), hw, valid))
        return x + self.drop_path(self.ffn(self.norm2(x)))


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
                          self.act_cfg, self.ffn_act_cfg) for rate in drop_path_rates
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
