"""HAT-Net: Vision Transformers with Hierarchical Attention.

Paper: Yun Liu, Yu-Huan Wu, Guolei Sun, Le Zhang, Ajad Chhatkuli, Luc Van Gool,
"Vision Transformers with Hierarchical Attention", Machine Intelligence Research 2024
(arXiv 2106.03180). Official classification code: yun-liu/HAT-Net, ``HAT_Net.py``
(MIT licence). This file is an independent implementation; equality with the official
model is proven by ``tests/test_backbones/test_hatnet.py`` on the reference cases.

The same code serves TransCNN, the paper's first version (``transcnn.py`` only swaps the
norm, the downsampling block and the inverted residual's norm placement).

Dense prediction (what differs from the official classifier, see README "Any input size"):
the official grid attention needs every stage map to be a multiple of its grid size G,
i.e. inputs that are multiples of 224. Here each H-MHSA pads its q/k/v (after the norms,
so normalisation statistics never see padding) to a multiple of G, masks padded keys in
the local attention, crops back, and pools the global keys/values with ``ceil_mode`` so
every pooled token is the mean of valid pixels only. The outputs at valid positions are
therefore independent of the internal padding, and identical to the official model when no
padding is needed.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmcv.cnn.bricks import DropPath
from mmengine.model.weight_init import trunc_normal_
from torch import nn

from mmhat.registry import MODELS
from ..layers import (attention, crop, pad_amounts, pad_bottom_right, use_fused_attn,
                      window_partition, window_reverse)
from .base import PyramidBackbone


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------
def heads_from_nchw(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, h*d, H, W)`` (channel = head*d + j) -> ``(B, h, H*W, d)``."""
    B, C, H, W = x.shape
    x = x.view(B, num_heads, C // num_heads, H * W)  # (B, h, d, N)
    return x.transpose(-2, -1)  # (B, h, N, d)


def heads_to_nchw(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """``(B, h, H*W, d)`` -> ``(B, h*d, H, W)``, the inverse of :func:`heads_from_nchw`."""
    B, h, N, d = x.shape
    return x.transpose(-2, -1).reshape(B, h * d, *hw)  # (B, C, H, W)


class HMHSA(nn.Module):
    """Hierarchical multi-head self-attention (paper Sec. 3.2), on NCHW maps.

    With grid size ``G > 1``:

    1. local level: multi-head attention inside non-overlapping ``G x G`` cells of
       ``qkv(norm(x))``;
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
        if embed_dims % num_heads:
            raise ValueError(f'embed_dims {embed_dims} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.grid_size = grid_size
        self.ds_ratio = ds_ratio
        self.scale = (embed_dims // num_heads)**-0.5
        self.fused = fused
        self.norm = build_norm_layer(norm_cfg, embed_dims)[1]
        self.qkv = nn.Conv2d(embed_dims, embed_dims * 3, 1)
        self.proj = nn.Conv2d(embed_dims, embed_dims, 1)
        if grid_size > 1:
            self.grid_norm = build_norm_layer(norm_cfg, embed_dims)[1]
            self.ds_norm = build_norm_layer(norm_cfg, embed_dims)[1]
            self.q = nn.Conv2d(embed_dims, embed_dims, 1)
            self.kv = nn.Conv2d(embed_dims, embed_dims * 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``, any H and W."""
        hw = x.shape[-2:]
        fused = use_fused_attn(self.fused)
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W), channels [q | k | v], head-major
        if self.grid_size == 1:
            q, k, v = heads_from_nchw(qkv, 3 * self.num_heads).chunk(3, dim=1)  # (B, h, N, d)
            return self.proj(heads_to_nchw(attention(q, k, v, self.scale, fused=fused), hw))

        local = self.grid_attention(qkv, fused)  # (B, C, H, W)
        g = self.grid_norm(x + local)
        q = heads_from_nchw(self.q(g), self.num_heads)  # (B, h, N, d)
        # ceil_mode: border windows average their valid pixels only (no padded keys).
        pooled = F.avg_pool2d(g, self.ds_ratio, self.ds_ratio, ceil_mode=True)
        k, v = heads_from_nchw(self.kv(self.ds_norm(pooled)),
                               2 * self.num_heads).chunk(2, dim=1)  # (B, h, N/r^2, d)
        glb = heads_to_nchw(attention(q, k, v, self.scale, fused=fused), hw)  # (B, C, H, W)
        return self.proj(glb + g)

    def grid_attention(self,
                       qkv: torch.Tensor,
                       fused: bool,
                       padded_hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Local level: attention inside ``G x G`` cells, padded keys masked.

        Args:
            qkv: ``(B, 3C, H, W)``.
            fused: attention path.
            padded_hw: size to pad to (multiples of G, at least H x W); default: the
                smallest. Any choice gives the same result (tests use a larger one).

        Returns:
            ``(B, C, H, W)``.
        """
        B, C3, H, W = qkv.shape
        G, h = self.grid_size, self.num_heads
        if padded_hw is None:
            pad_h, pad_w = pad_amounts((H, W), G)
        else:
            pad_h, pad_w = padded_hw[0] - H, padded_hw[1] - W
        qkv = pad_bottom_right(qkv, pad_h, pad_w)  # (B, 3C, Hp, Wp)
        cells = window_partition(qkv, G)  # (B, nH, nW, G*G, 3C)
        _, nH, nW, _, _ = cells.shape
        cells = cells.reshape(B * nH * nW, G * G, 3, h, C3 // (3 * h))  # (B', G*G, 3, h, d)
        q, k, v = cells.permute(2, 0, 3, 1, 4).unbind(0)  # each (B', h, G*G, d)
        mask = None
        if pad_h or pad_w:
            mask = self._valid_key_mask((H, W), (H + pad_h, W + pad_w), qkv.device)
            mask = mask.repeat(B, 1, 1, 1)  # (B', 1, 1, G*G)
        out = attention(q, k, v, self.scale, attn_mask=mask, fused=fused)  # (B', h, G*G, d)
        out = out.transpose(1, 2).reshape(B, nH, nW, G * G, C3 // 3)  # (B, nH, nW, G*G, C)
        return crop(window_reverse(out, G), (H, W))  # (B, C, H, W)

    def _valid_key_mask(self, hw: Tuple[int, int], padded_hw: Tuple[int, int],
                        device: torch.device) -> torch.Tensor:
        """``(nH*nW, 1, 1, G*G)`` bool: True where a cell's key is a real pixel.

        Cells made only of padding (possible only with a larger ``padded_hw``) attend to
        everything; their outputs are cropped away, and this avoids NaN rows.
        """
        G = self.grid_size
        valid = torch.zeros(1, 1, *padded_hw, dtype=torch.bool, device=device)
        valid[..., :hw[0], :hw[1]] = True
        cells = window_partition(valid, G).flatten(0, 2)  # (nH*nW, G*G, 1)
        cells = cells.squeeze(-1) | ~cells.squeeze(-1).any(dim=1, keepdim=True)  # (nH*nW, G*G)
        return cells[:, None, None, :]  # (nH*nW, 1, 1, G*G)


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
        self.expand = nn.Conv2d(embed_dims, hidden, 1, bias=False)
        self.expand_norm = norm(hidden, inner_norms)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2,
                                groups=hidden, bias=False)
        self.dw_norm = norm(hidden, inner_norms)
        self.project = nn.Conv2d(hidden, embed_dims, 1, bias=False)
        self.out_norm = norm(embed_dims, True)
        self.act = build_activation_layer(act_cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        x = self.act(self.expand_norm(self.expand(self.pre_norm(x))))
        x = self.act(self.dw_norm(self.dwconv(x)))
        return self.out_norm(self.project(x))


class HATBlock(nn.Module):
    """``x + DropPath(HMHSA(x))``, then ``x + DropPath(InvertedResidual(x))``."""

    def __init__(self, attn: HMHSA, ffn: InvertedResidual, drop_path: float) -> None:
        super().__init__()
        self.attn = attn
        self.ffn = ffn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.ffn(x))


class ConvDownsample(nn.Module):
    """HAT-Net's downsampling between stages: 3x3 stride-2 conv, then norm."""

    def __init__(self, in_dims: int, out_dims: int, norm_cfg: dict, act_cfg: dict) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dims, out_dims, 3, stride=2, padding=1)
        self.norm = build_norm_layer(norm_cfg, out_dims)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, ceil(H/2), ceil(W/2))``."""
        return self.norm(self.conv(x))


class HATStage(nn.Module):
    """One stage: optional downsample, then its blocks."""

    def __init__(self, downsample: Optional[nn.Module], blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.ModuleList(blocks)


# ---------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------
@MODELS.register_module()
class HATNet(PyramidBackbone):
    """HAT-Net backbone: conv stem, then four stages of (H-MHSA, inverted residual) blocks.

    Outputs are the last block of each stage (no extra norm, as in the official model):
    strides 4, 8, 16, 32 with ``out_channels = embed_dims[i]`` for ``i in out_indices``.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'medium'``, ``'large'`` or a dict with the keys of
            ``arch_zoo``.
        drop_path_rate: stochastic depth, rising linearly over all blocks to this value.
        norm_cfg: norm everywhere (default GroupNorm(1), eps 1e-6, as the paper).
        act_cfg: activation of the stem and the inverted residuals (default SiLU).
        fused_attn: attention path (None: process default, see ``layers.attention``).
        out_indices, frozen_stages, norm_eval, with_cp, pretrained, init_cfg: see
            :class:`PyramidBackbone`.

    Input: ``(B, 3, H, W)``, any ``H, W >= 32``. Output: tuple of ``(B, C_i, H_i, W_i)``
    with ``H_1 = ceil(H / 4)`` and ``H_{i+1} = ceil(H_i / 2)``.
    """
    arch_zoo = {
        #            embed_dims              num_heads        mlp_ratios      grid_sizes     ds_ratios      depths           kernel_sizes    stem_channels
        'tiny':   dict(embed_dims=(48, 96, 240, 384),  num_heads=(1, 2, 5, 8),  mlp_ratios=(8, 8, 4, 4), grid_sizes=(8, 7, 7, 1), ds_ratios=(8, 4, 2, 1), depths=(2, 2, 6, 3),  kernel_sizes=(3, 3, 3, 3), stem_channels=16),  # noqa: E501
        'small':  dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),  mlp_ratios=(8, 8, 4, 4), grid_sizes=(8, 7, 7, 1), ds_ratios=(8, 4, 2, 1), depths=(2, 3, 8, 3),  kernel_sizes=(3, 3, 3, 3), stem_channels=16),  # noqa: E501
        'medium': dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),  mlp_ratios=(8, 8, 4, 4), grid_sizes=(8, 7, 7, 1), ds_ratios=(8, 4, 2, 1), depths=(3, 6, 18, 3), kernel_sizes=(5, 3, 5, 3), stem_channels=16),  # noqa: E501
        'large':  dict(embed_dims=(64, 128, 320, 640), num_heads=(1, 2, 5, 10), mlp_ratios=(8, 8, 4, 4), grid_sizes=(8, 7, 7, 1), ds_ratios=(8, 4, 2, 1), depths=(3, 8, 27, 3), kernel_sizes=(3, 3, 3, 3), stem_channels=16),  # noqa: E501
    }
    default_norm_cfg = dict(type='GN', num_groups=1, eps=1e-6)
    downsample_cls = ConvDownsample
    #: where the inverted residual normalises (see :class:`InvertedResidual`)
    ffn_pre_norm, ffn_inner_norms = True, False

    def __init__(self,
                 arch: Union[str, dict] = 'small',
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_path_rate: float = 0.0,
                 norm_cfg: Optional[dict] = None,
                 act_cfg: dict = dict(type='SiLU'),
                 fused_attn: Optional[bool] = None,
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[Union[dict, list]] = None) -> None:
        super().__init__(arch, out_indices, frozen_stages, norm_eval, with_cp, pretrained,
                         init_cfg)
        s = self.arch_settings
        norm_cfg = dict(norm_cfg if norm_cfg is not None else self.default_norm_cfg)
        dims = s['embed_dims']
        self.out_channels = [dims[i] for i in self.out_indices]

        self.stem = nn.Sequential()
        self.stem.add_module('conv1', nn.Conv2d(3, s['stem_channels'], 3, stride=2, padding=1))
        self.stem.add_module('norm1', build_norm_layer(norm_cfg, s['stem_channels'])[1])
        self.stem.add_module('act', build_activation_layer(act_cfg))
        self.stem.add_module('conv2', nn.Conv2d(s['stem_channels'], dims[0], 3, stride=2,
                                                padding=1))

        rates = torch.linspace(0, drop_path_rate, sum(s['depths'])).tolist()
        self.stages = nn.ModuleList()
        for i in range(self.num_stages):
            blocks = []
            for _ in range(s['depths'][i]):
                attn = HMHSA(dims[i], s['num_heads'][i], s['grid_sizes'][i], s['ds_ratios'][i],
                             norm_cfg, fused_attn)
                ffn = InvertedResidual(dims[i], s['mlp_ratios'][i], s['kernel_sizes'][i],
                                       norm_cfg, act_cfg, self.ffn_pre_norm,
                                       self.ffn_inner_norms)
                blocks.append(HATBlock(attn, ffn, rates.pop(0)))
            downsample = (self.downsample_cls(dims[i - 1], dims[i], norm_cfg, act_cfg)
                          if i > 0 else None)
            self.stages.append(HATStage(downsample, blocks))
        self.use_channels_last()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``(B, 3, H, W)`` -> tuple of NCHW maps at strides 4/8/16/32 for ``out_indices``."""
        self.check_input(x)
        x = self.run_block(self.stem, x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = self.run_block(stage.downsample, x)
            for block in stage.blocks:
                x = self.run_block(block, x)
            if i in self.out_indices:
                outs.append(self.output_map(x))
        return tuple(outs)

    def init_default_weights(self) -> None:
        """Official init: truncated normal (std 0.02) conv/linear weights, zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # Official HAT_Net.py key -> mmhat key (applied in order to every key).
    official_rename_rules = [
        (r'^patch_embed\.0\.', 'stem.conv1.'),
        (r'^patch_embed\.1\.', 'stem.norm1.'),
        (r'^patch_embed\.3\.', 'stem.conv2.'),
        (r'^ds(\d)\.', lambda m: f'stages.{int(m[1]) - 1}.downsample.'),
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
