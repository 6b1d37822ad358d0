"""HAT-Net: Vision Transformers with Hierarchical Attention.

Paper: Yun Liu, Yu-Huan Wu, Guolei Sun, Le Zhang, Ajad Chhatkuli, Luc Van Gool,
"Vision Transformers with Hierarchical Attention", Machine Intelligence Research 2024
(arXiv 2106.03180). Official classification code: yun-liu/HAT-Net, ``HAT_Net.py`` at
commit 8f72ce4 (the repository states no licence). This file is an independent
implementation; equality with the official model is proven by
``tests/test_backbones/test_contract.py`` on the reference cases.

The same code serves TransCNN, the paper's first version (``transcnn.py`` only swaps the
norm, the downsampling block and the inverted residual's norm placement).

Dense prediction (what differs from the official classifier; docs/verification.md, "Any input
size"):
the official grid attention needs every stage map to be a multiple of its grid size G,
i.e. inputs that are multiples of 224. Here each H-MHSA pads its q/k/v (after the norms,
so normalisation statistics never see padding) to a multiple of G, masks padded keys in
the local attention, crops back, and pools the global keys/values with ``ceil_mode`` so
every pooled token is the mean of valid pixels only. The outputs at valid positions are
therefore independent of the internal padding, and identical to the official model when no
padding is needed.
"""
from collections import OrderedDict
from typing import List, Optional, Union

import torch
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.model.weight_init import trunc_normal_init
from torch import nn

from mmhat.registry import MODELS
from ..layers import (DepthwiseConv2d, PointwiseConv2d, act_then_conv, attention,
                      attention_input, ceil_pool2d, drop_path, head_dims, merge_heads_nchw,
                      pad_amounts, pointwise_then_norm, split_heads_nchw, use_fused_attn,
                      window_attention)
from .base import Publication, PyramidBackbone, PyramidStage


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------
class HATAttention(nn.Module):
    """Hierarchical multi-head self-attention, H-MHSA (paper Sec. 3.2), on NCHW maps.

    With grid size ``G > 1``:

    1. local level: multi-head attention inside non-overlapping ``G x G`` cells of
       ``qkv(norm(x))`` (:func:`~mmhat.models.layers.window_attention`);
    2. ``g = grid_norm(x + local)`` (the residual is the raw input, as in the official code);
    3. global level: queries ``q(g)`` attend to keys/values ``kv(ds_norm(avgpool_r(g)))``;
    4. ``out = proj(global + g)``.

    With ``G == 1`` (the last stage) it is plain multi-head attention over all tokens.

    Args:
        embed_dims: channels C.
        num_heads: heads h (head width C / h; scale ``(C / h) ** -0.5``).
        grid_size: cell size G of the local level (1: plain attention).
        ds_ratio: average-pool ratio r of the global level's keys/values.
        norm_cfg: norm of ``norm`` / ``grid_norm`` / ``ds_norm``.
        fused: attention path (None: the process-wide default, see ``layers.attention``).
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 grid_size: int,
                 ds_ratio: int,
                 norm_cfg: dict,
                 fused: Optional[bool] = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.grid_size = grid_size
        self.ds_ratio = ds_ratio
        self.scale = head_dims(embed_dims, num_heads)**-0.5
        self.fused = fused
        self.norm = build_norm_layer(norm_cfg, embed_dims)[1]
        self.qkv = PointwiseConv2d(embed_dims, embed_dims * 3)
        self.proj = PointwiseConv2d(embed_dims, embed_dims)
        if grid_size > 1:
            self.grid_norm = build_norm_layer(norm_cfg, embed_dims)[1]
            self.ds_norm = build_norm_layer(norm_cfg, embed_dims)[1]
            self.q = PointwiseConv2d(embed_dims, embed_dims)
            self.kv = PointwiseConv2d(embed_dims, embed_dims * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``, any H and W."""
        hw = x.shape[-2:]
        fused = use_fused_attn(self.fused)
        # q/k/v projections feed the attention only (with_cp's replay skips their products)
        qkv = attention_input(self.qkv, self.norm(x), fused)  # (B, 3C, H, W), [q | k | v]
        if self.grid_size == 1:
            q, k, v = split_heads_nchw(qkv, 3 * self.num_heads).chunk(3, dim=1)  # (B, h, N, d)
            return self.proj(merge_heads_nchw(attention(q, k, v, self.scale, fused=fused), hw))

        # Pad q/k/v (after the norm: its statistics never see padding) to whole cells.
        local = window_attention(qkv, self.grid_size, self.num_heads, self.scale,
                                 pad_amounts(hw, self.grid_size), fused)  # (B, C, H, W)
        g = self.grid_norm(x + local)
        q = split_heads_nchw(attention_input(self.q, g, fused), self.num_heads)  # (B, h, N, d)
        # ceil_mode: border windows average their valid pixels only (no padded keys).
        pooled = ceil_pool2d(g, self.ds_ratio, 'avg')  # (B, C, ceil(H/r), ceil(W/r))
        k, v = split_heads_nchw(attention_input(self.kv, self.ds_norm(pooled), fused),
                                2 * self.num_heads).chunk(2, dim=1)  # (B, h, N/r^2, d)
        glb = merge_heads_nchw(attention(q, k, v, self.scale, fused=fused), hw)  # (B, C, H, W)
        return self.proj(glb + g)


class InvertedResidual(nn.Module):
    """Inverted residual FFN (MobileNetV2 style): 1x1 expand, kxk depthwise, 1x1 project.

    HAT-Net normalises the input (``pre_norm``) and the output only; TransCNN normalises
    after each conv (``inner_norms``). Norms that a family does not have are ``Identity``,
    so the forward and the state-dict names are the same for both.

    Args:
        embed_dims: channels C (in and out).
        mlp_ratio: expansion e (hidden channels C * e).
        kernel_size: depthwise kernel k.
        norm_cfg / act_cfg: norm and activation.
        pre_norm: norm the input (HAT-Net).
        inner_norms: norm after the expand and depthwise convs (TransCNN).
    """

    def __init__(self, embed_dims: int, mlp_ratio: int, kernel_size: int, norm_cfg: dict,
                 act_cfg: dict, pre_norm: bool, inner_norms: bool) -> None:
        super().__init__()
        hidden = embed_dims * mlp_ratio

        def norm(channels: int, present: bool) -> nn.Module:
            return build_norm_layer(norm_cfg, channels)[1] if present else nn.Identity()

        self.pre_norm = norm(embed_dims, pre_norm)
        self.expand = PointwiseConv2d(embed_dims, hidden, bias=False)
        self.expand_norm = norm(hidden, inner_norms)
        self.dwconv = DepthwiseConv2d(hidden, kernel_size, bias=False)
        self.dw_norm = norm(hidden, inner_norms)
        self.project = PointwiseConv2d(hidden, embed_dims, bias=False)
        self.out_norm = norm(embed_dims, True)
        self.act = build_activation_layer(act_cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        # TransCNN's training-mode BatchNorm is folded into the expanding conv
        x = pointwise_then_norm(self.expand, self.expand_norm, self.pre_norm(x))
        # conv(act(x)) keeping only x for the backward (it recomputes the activation)
        x = self.dw_norm(act_then_conv(self.act, self.dwconv, x))
        return self.out_norm(act_then_conv(self.act, self.project, x))


class HATBlock(nn.Module):
    """``x + DropPath(HATAttention(x))``, then ``x + DropPath(InvertedResidual(x))``."""

    def __init__(self, attn: HATAttention, ffn: InvertedResidual, drop_path_rate: float) -> None:
        super().__init__()
        self.attn = attn
        self.ffn = ffn
        self.drop_path = drop_path(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.ffn(x))


class ConvDownsample(nn.Module):
    """HAT-Net's downsampling between stages: 3x3 stride-2 conv, then norm."""

    def __init__(self, in_dims: int, out_dims: int, norm_cfg: dict) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dims, out_dims, 3, stride=2, padding=1)
        self.norm = build_norm_layer(norm_cfg, out_dims)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, ceil(H/2), ceil(W/2))``."""
        return self.norm(self.conv(x))


class HATStage(PyramidStage):
    """One stage on NCHW maps: the downsampling ``patch_embed`` (``Identity`` in stage 0),
    then the blocks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C, ceil(H/2), ceil(W/2))`` (stage 0: same size)."""
        if self.training and torch.is_grad_enabled() and not x.requires_grad:
            # After a frozen stem, stage 0's first GroupNorm gets an input that needs no
            # gradient; PyTorch's CPU GroupNorm backward on channels-last maps then
            # dereferences the missing input gradient and crashes (torch 2.13:
            # `GroupNorm(1, C)(x_channels_last).sum().backward()`). Asking for it costs
            # one norm's input gradient.
            x = x.detach().requires_grad_()
        return self.run_blocks(self.run(self.patch_embed, x))


# ---------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------
@MODELS.register_module()
class HATNet(PyramidBackbone):
    """HAT-Net backbone: conv stem, then four stages of (H-MHSA, inverted residual) blocks.

    Outputs are the last block of each stage (no extra norm, as in the official model):
    strides 4, 8, 16, 32 with ``out_channels = embed_dims[i]`` for ``i in out_indices``.

    Args:
        arch: ``'tiny'``, ``'small'`` (default), ``'medium'``, ``'large'`` or a dict with the
            keys of ``arch_zoo``.
        fused_attn: attention path (None: process default, see ``layers.attention``).
        **kwargs: the arguments of :class:`PyramidBackbone` (``out_indices``,
            ``drop_path_rate``, ``frozen_stages``, ``norm_eval``, ``with_cp``,
            ``channels_last``, ``init_cfg``, ...). ``norm_cfg`` is the norm everywhere (default
            GroupNorm(1), eps 1e-6, as the paper), ``act_cfg`` the activation of the stem and
            the inverted residuals (default SiLU).

    Input: ``(B, 3, H, W)``, any ``H, W >= 32``. Output: tuple of ``(B, C_i, H_i, W_i)``
    with ``H_1 = ceil(H / 4)`` and ``H_{i+1} = ceil(H_i / 2)``.
    """
    publication = Publication(  # paper, official code at the commit read, checkpoints
        'HAT-Net', 'Vision Transformers with Hierarchical Attention', 'Machine Intelligence Research 2024', 'https://arxiv.org/abs/2106.03180',  # noqa: E501
        code='https://github.com/yun-liu/HAT-Net/blob/8f72ce41761b8a2715dc3b18788a8234b91bea1f/HAT_Net.py',  # noqa: E501
        published='GitHub release v2.0 of yun-liu/HAT-Net (the configs download it from there); also Google Drive, linked in its README',  # noqa: E501
        imagenet_top1={'tiny': 79.8, 'small': 82.6, 'medium': 84.0, 'large': 84.2},
        imagenet_source='yun-liu/HAT-Net README, "Acc@1" (224x224)')
    arch_zoo = {
        #            embed_dims              num_heads        mlp_ratios      grid_sizes     ds_ratios      depths           kernel_sizes    stem_channels
        'tiny':   dict(embed_dims=(48, 96, 240, 384),  num_heads=(1, 2, 5, 8),  mlp_ratios=(8, 8, 4, 4), grid_sizes=(8, 7, 7, 1), ds_ratios=(8, 4, 2, 1), depths=(2, 2, 6, 3),  kernel_sizes=(3, 3, 3, 3), stem_channels=16),  # noqa: E501
        'small':  dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),  mlp_ratios=(8, 8, 4, 4), grid_sizes=(8, 7, 7, 1), ds_ratios=(8, 4, 2, 1), depths=(2, 3, 8, 3),  kernel_sizes=(3, 3, 3, 3), stem_channels=16),  # noqa: E501
        'medium': dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),  mlp_ratios=(8, 8, 4, 4), grid_sizes=(8, 7, 7, 1), ds_ratios=(8, 4, 2, 1), depths=(3, 6, 18, 3), kernel_sizes=(5, 3, 5, 3), stem_channels=16),  # noqa: E501
        'large':  dict(embed_dims=(64, 128, 320, 640), num_heads=(1, 2, 5, 10), mlp_ratios=(8, 8, 4, 4), grid_sizes=(8, 7, 7, 1), ds_ratios=(8, 4, 2, 1), depths=(3, 8, 27, 3), kernel_sizes=(3, 3, 3, 3), stem_channels=16),  # noqa: E501
    }
    smallest_arch, base_size_arch = 'tiny', 'medium'
    fused_attention = True
    cpu_conv_kernels = True
    windowed_attention = True  # the local level of H-MHSA (grid size > 1)
    internal_padding = True
    default_norm_cfg = dict(type='GN', num_groups=1, eps=1e-6)
    default_act_cfg = dict(type='SiLU')
    reference_name = 'hatnet'
    #: where the inverted residual normalises (see :class:`InvertedResidual`)
    ffn_pre_norm, ffn_inner_norms = True, False

    def __init__(self, arch: Union[str, dict, None] = None, *, fused_attn: Optional[bool] = None,
                 **kwargs) -> None:
        self.fused_attn = fused_attn
        super().__init__(arch, **kwargs)

    def build_stem(self) -> nn.Module:
        """Two 3x3 stride-2 convs (norm and act between them): stride 4, ``embed_dims[0]``."""
        mid, out = self.arch_settings['stem_channels'], self.arch_settings['embed_dims'][0]
        return nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(self.in_channels, mid, 3, stride=2, padding=1),
            norm1=build_norm_layer(self.norm_cfg, mid)[1],
            act=build_activation_layer(self.act_cfg),
            conv2=nn.Conv2d(mid, out, 3, stride=2, padding=1)))

    def build_downsample(self, in_dims: int, out_dims: int) -> nn.Module:
        """The entry of stages 1..: stride 2, ``in_dims -> out_dims``."""
        return ConvDownsample(in_dims, out_dims, self.norm_cfg)

    def build_stage(self, i: int, drop_path_rates: List[float]) -> HATStage:
        s, dims = self.arch_settings, self.arch_settings['embed_dims']
        blocks = [
            HATBlock(
                HATAttention(dims[i], s['num_heads'][i], s['grid_sizes'][i], s['ds_ratios'][i],
                             self.norm_cfg, self.fused_attn),
                InvertedResidual(dims[i], s['mlp_ratios'][i], s['kernel_sizes'][i],
                                 self.norm_cfg, self.act_cfg, self.ffn_pre_norm,
                                 self.ffn_inner_norms), rate) for rate in drop_path_rates
        ]
        entry = self.build_downsample(dims[i - 1], dims[i]) if i > 0 else nn.Identity()
        return HATStage(entry, blocks)

    def init_default_weights(self) -> None:
        """Official init: truncated normal (std 0.02) conv/linear weights, zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_init(m, std=0.02, bias=0)

    # Official HAT_Net.py key -> mmhat key (applied in order to every key).
    official_rename_rules = [
        (r'^patch_embed\.0\.', 'stem.conv1.'),
        (r'^patch_embed\.1\.', 'stem.norm1.'),
        (r'^patch_embed\.3\.', 'stem.conv2.'),
        (r'^ds(\d)\.', lambda m: f'stages.{int(m[1]) - 1}.patch_embed.'),
        (r'^blocks\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
        (r'\.conv\.conv1\.0\.', '.ffn.pre_norm.'),
        (r'\.conv\.conv1\.1\.', '.ffn.expand.'),
        (r'\.conv\.conv2\.0\.', '.ffn.dwconv.'),
        (r'\.conv\.conv3\.0\.', '.ffn.project.'),
        (r'\.conv\.conv3\.1\.', '.ffn.out_norm.'),
    ]
    official_drop_rules = [
        (r'^classifier\.', 'classification head'),
        (r'\.attn\.proj_norm\.', 'never used by the official forward'),
    ]
    # The official classifier (pool, Dropout, Linear) -> mmhat.OfficialClsHead's keys.
    official_head_rules = [(r'^classifier\.1\.', 'fc.')]
    # mmhat 0.1 called the stage entry `downsample`.
    legacy_rename_rules = [(r'^stages\.(\d+)\.downsample\.', r'stages.\1.patch_embed.')]
