"""Shunted Transformer: Shunted Self-Attention via Multi-Scale Token Aggregation.

Paper: Sucheng Ren, Daquan Zhou, Shengfeng He, Jiashi Feng, Xinchao Wang, "Shunted
Self-Attention via Multi-Scale Token Aggregation", CVPR 2022 (arXiv 2111.15193). Official
classification code: OliverRensu/Shunted-Transformer, ``SSA.py`` (commit 6861101; the
repository states no licence). This file is an independent implementation; equality with
the official model is proven by ``tests/test_backbones/test_contract.py`` on the reference
case.

Dense prediction (what differs from the official classifier; see :class:`ShuntedTransformer`
for the exact statement): the official strided convs (the stem's 2x2 patch merge and the
attention's token-reducing convs) floor, so at sizes that are not multiples of 32 the
trailing rows/columns of a map silently take no part. Here each of them pads its input at
the bottom/right by less than one window, so every token takes part and stage ``i`` has
``ceil(H / 2**(i+2))`` rows. Nothing is padded at multiples of 32, where the outputs are
the official ones.
"""
import re
from typing import Dict, List, Optional, Tuple, Union

import torch
from mmcv.cnn import ConvModule, build_activation_layer, build_norm_layer
from mmengine.model.weight_init import constant_init, normal_init, trunc_normal_init
from torch import nn

from mmhat.registry import MODELS
from ..layers import (attention, drop_path, head_dims, merge_heads, nchw_to_nlc, nlc_to_nchw,
                      pad_amounts, pad_bottom_right, split_heads, use_fused_attn)
from .base import Publication, PyramidBackbone, PyramidStage

# The official LayerNorm eps values: ``partial(nn.LayerNorm, eps=1e-6)`` for the block and
# stage-output norms, PyTorch's default 1e-5 for the patch embeddings and the key/value
# branches (which the official code builds with a bare ``nn.LayerNorm``).
BLOCK_NORM_CFG = dict(type='LN', eps=1e-6)
EMBED_NORM_CFG = dict(type='LN', eps=1e-5)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def ceil_padding(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Extra bottom/right zeros for a conv to output ``ceil(size / stride)`` positions.

    0 for the official 3x3/2 (pad 1) convs, which already ceil; ``size % 2`` for a 2x2/2
    conv; ``(-size) % r`` for an ``r x r`` stride-``r`` conv.
    """
    # (size + stride - 1) // stride, not -(-size // stride): under ONNX tracing ``size`` is
    # a traced int and ONNX's integer Div truncates, which turns the latter into a floor.
    out = (size + stride - 1) // stride
    return max(0, (out - 1) * stride + kernel_size - 2 * padding - size)


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------
class ConvPatchEmbed(nn.Module):
    """Strided conv, then tokens and LayerNorm (paper Sec. 3.3 "patch embedding").

    Stage 0 uses a 2x2 stride-2 conv after the stem, stages 1.. a 3x3 stride-2 conv with
    padding 1 (the official ``OverlapPatchEmbed``). The input is zero-padded at the
    bottom/right where needed so that the output always has ``ceil(H / stride)`` rows and
    columns (the official 2x2 conv floors and drops the last row/column of odd maps).

    Args:
        in_dims: input channels.
        out_dims: output channels C.
        kernel_size: conv kernel (padding ``(kernel_size - 1) // 2``).
        stride: conv stride.
    """

    def __init__(self, in_dims: int, out_dims: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dims, out_dims, kernel_size, stride,
                              padding=(kernel_size - 1) // 2)
        self.norm = build_norm_layer(EMBED_NORM_CFG, out_dims)[1]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """``(B, C_in, H, W)`` -> tokens ``(B, H'*W', C)`` and ``(H', W') = ceil((H, W) / s)``."""
        k, s, p = self.proj.kernel_size[0], self.proj.stride[0], self.proj.padding[0]
        pad_h, pad_w = (ceil_padding(size, k, s, p) for size in x.shape[-2:])
        x = self.proj(pad_bottom_right(x, pad_h, pad_w))  # (B, C, H', W')
        hw = (x.shape[2], x.shape[3])
        return self.norm(nchw_to_nlc(x)), hw  # (B, H'*W', C)


class KeyValueBranch(nn.Module):
    """One key/value branch of shunted self-attention (paper Sec. 3.1, Eq. 1).

    Tokens are aggregated by an ``r x r`` stride-``r`` conv (``reduce``; the official
    ``sr{1,2}``), normalised, activated and projected to keys and values of ``num_heads``
    heads; the values get a depthwise 3x3 "local enhancement" (``v + local_conv(v)``)
    before the attention.

    The map is zero-padded at the bottom/right to a multiple of ``r`` first, so every
    token takes part and there are ``ceil(H / r) * ceil(W / r)`` keys (the official code
    floors and drops the trailing rows/columns). The padding is less than one window, so
    no key is made of padding only; at sizes divisible by ``r`` nothing is padded.

    Args:
        embed_dims: channels C of the input map.
        out_dims: channels of the keys (and of the values): ``num_heads * head_dims``.
        rate: kernel and stride r of the aggregating conv (1: a 1x1 conv, no reduction).
        act_cfg: activation after the norm (official: GELU).
    """

    def __init__(self, embed_dims: int, out_dims: int, rate: int, act_cfg: dict) -> None:
        super().__init__()
        self.rate = rate
        self.reduce = nn.Conv2d(embed_dims, embed_dims, rate, stride=rate)
        self.norm = build_norm_layer(EMBED_NORM_CFG, embed_dims)[1]
        self.act = build_activation_layer(act_cfg)
        self.kv = nn.Linear(embed_dims, 2 * out_dims)
        self.local_conv = nn.Conv2d(out_dims, out_dims, 3, padding=1, groups=out_dims)

    def forward(self, x: torch.Tensor,
                num_heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` -> keys and values, each ``(B, num_heads, M, d)``, with
        ``M = ceil(H / r) * ceil(W / r)``."""
        pad_h, pad_w = pad_amounts(x.shape[-2:], self.rate)
        x = self.reduce(pad_bottom_right(x, pad_h, pad_w))  # (B, C, H/r, W/r)
        hw = (x.shape[2], x.shape[3])
        x = self.act(self.norm(nchw_to_nlc(x)))  # (B, M, C)
        B, M, _ = x.shape
        kv = self.kv(x).view(B, M, 2, num_heads, -1)  # (B, M, [k | v], h, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, M, d)
        v_map = nlc_to_nchw(merge_heads(v), hw)  # (B, h*d, H/r, W/r)
        v = v + split_heads(nchw_to_nlc(self.local_conv(v_map)), num_heads)  # (B, h, M, d)
        return k, v


class ShuntedAttention(nn.Module):
    """Shunted self-attention (paper Sec. 3.1), on tokens of an ``H x W`` map.

    With ``sr_ratio = r > 1`` the heads are split into two equal groups: the first attends
    to keys/values aggregated at rate ``r``, the second at rate ``r / 2`` (one
    :class:`KeyValueBranch` each), so one layer mixes coarse and fine tokens; the head
    outputs are concatenated (head-major) and projected. With ``sr_ratio == 1`` (the last
    stage) it is plain multi-head attention over all tokens, and the local enhancement
    ``local_conv(v)`` is added to the attention output (not to the values), as in the
    official code. Every head group calls the shared :func:`~mmhat.models.layers.attention`
    kernel with scale ``head_dims ** -0.5``.

    Args:
        embed_dims: channels C.
        num_heads: heads h (head width C / h; even when ``sr_ratio > 1``).
        sr_ratio: token-aggregation rate r of the first head group (1 or even).
        act_cfg: activation of the key/value branches.
        fused: attention path (None: the process-wide default, see ``layers.attention``).
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 sr_ratio: int,
                 act_cfg: dict,
                 fused: Optional[bool] = None) -> None:
        super().__init__()
        self.scale = head_dims(embed_dims, num_heads)**-0.5
        rates = (sr_ratio, sr_ratio // 2) if sr_ratio > 1 else ()
        if rates and (sr_ratio % 2 or num_heads % len(rates)):
            raise ValueError(f'shunted attention with sr_ratio {sr_ratio} needs an even '
                             f'sr_ratio (rates r and r/2) and an even num_heads, got '
                             f'{num_heads} heads')
        self.num_heads = num_heads
        self.fused = fused
        self.q = nn.Linear(embed_dims, embed_dims)
        if rates:
            branch_dims = embed_dims // len(rates)
            self.branches = nn.ModuleList(
                KeyValueBranch(embed_dims, branch_dims, rate, act_cfg) for rate in rates)
        else:
            self.branches = nn.ModuleList()
            self.kv = nn.Linear(embed_dims, 2 * embed_dims)
            self.local_conv = nn.Conv2d(embed_dims, embed_dims, 3, padding=1,
                                        groups=embed_dims)
        self.proj = nn.Linear(embed_dims, embed_dims)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """``(B, H*W, C)`` -> ``(B, H*W, C)``."""
        fused = use_fused_attn(self.fused)
        q = split_heads(self.q(x), self.num_heads)  # (B, h, N, d)
        if not self.branches:
            return self.proj(self._full_attention(x, q, hw, fused))
        x_map = nlc_to_nchw(x, hw)  # (B, C, H, W)
        group_heads = self.num_heads // len(self.branches)
        outs = []
        for branch, q_group in zip(self.branches, q.split(group_heads, dim=1)):
            k, v = branch(x_map, group_heads)  # (B, h/2, M_r, d)
            outs.append(attention(q_group, k, v, self.scale, fused=fused))  # (B, h/2, N, d)
        return self.proj(merge_heads(torch.cat(outs, dim=1)))  # (B, N, C)

    def _full_attention(self, x: torch.Tensor, q: torch.Tensor, hw: Tuple[int, int],
                        fused: bool) -> torch.Tensor:
        """Attention over all tokens plus ``local_conv(v)``: ``(B, N, C)``."""
        B, N, _ = x.shape
        kv = self.kv(x).view(B, N, 2, self.num_heads, -1)  # (B, N, [k | v], h, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, d)
        out = merge_heads(attention(q, k, v, self.scale, fused=fused))  # (B, N, C)
        local = self.local_conv(nlc_to_nchw(merge_heads(v), hw))  # (B, C, H, W)
        return out + nchw_to_nlc(local)


class ConvFFN(nn.Module):
    """The official MLP: ``fc2(act(h + dwconv3x3(h)))`` with ``h = fc1(x)``.

    Unlike PVTv2's, the depthwise conv sits in a residual.

    Args:
        embed_dims: channels C (in and out).
        mlp_ratio: hidden channels ``C * mlp_ratio``.
        act_cfg: activation (official: GELU).
    """

    def __init__(self, embed_dims: int, mlp_ratio: int, act_cfg: dict) -> None:
        super().__init__()
        hidden = int(embed_dims * mlp_ratio)
        self.fc1 = nn.Linear(embed_dims, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = build_activation_layer(act_cfg)
        self.fc2 = nn.Linear(hidden, embed_dims)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """``(B, H*W, C)`` -> ``(B, H*W, C)``."""
        x = self.fc1(x)  # (B, N, rC)
        x = x + nchw_to_nlc(self.dwconv(nlc_to_nchw(x, hw)))  # (B, N, rC)
        return self.fc2(self.act(x))


class ShuntedBlock(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(attn(norm1(x)))``, then the same with
    the FFN; norms are LayerNorm(eps 1e-6).

    Args:
        embed_dims, num_heads, sr_ratio, fused: see :class:`ShuntedAttention`.
        mlp_ratio: see :class:`ConvFFN`.
        drop_path: stochastic depth rate of both residual branches.
        act_cfg: activation of the attention branches and the FFN.
    """

    def __init__(self, embed_dims: int, num_heads: int, sr_ratio: int, mlp_ratio: int,
                 drop_path_rate: float, act_cfg: dict, fused: Optional[bool] = None) -> None:
        super().__init__()
        self.norm1 = build_norm_layer(BLOCK_NORM_CFG, embed_dims)[1]
        self.attn = ShuntedAttention(embed_dims, num_heads, sr_ratio, act_cfg, fused)
        self.norm2 = build_norm_layer(BLOCK_NORM_CFG, embed_dims)[1]
        self.ffn = ConvFFN(embed_dims, mlp_ratio, act_cfg)
        self.drop_path = drop_path(drop_path_rate)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """``(B, H*W, C)`` -> ``(B, H*W, C)``."""
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.ffn(self.norm2(x), hw))


class ShuntedStage(PyramidStage):
    """One stage: patch embedding (to tokens), blocks, output LayerNorm (eps 1e-6), back to
    a map."""

    def __init__(self, patch_embed: ConvPatchEmbed, blocks: List[ShuntedBlock],
                 embed_dims: int) -> None:
        super().__init__(patch_embed, blocks)
        self.norm = build_norm_layer(BLOCK_NORM_CFG, embed_dims)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C, ceil(H/s), ceil(W/s))``, ``s`` the entry's stride."""
        tokens, hw = self.run(self.patch_embed, x)  # (B, H_i*W_i, C_i)
        tokens = self.run_blocks(tokens, hw)
        # a channels-last view: the next stage's conv takes it as it is
        return nlc_to_nchw(self.norm(tokens), hw)  # (B, C_i, H_i, W_i)


# ---------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------
@MODELS.register_module()
class ShuntedTransformer(PyramidBackbone):
    """Shunted Transformer backbone: conv stem, then four stages of shunted blocks.

    Outputs are the stage-output LayerNorms reshaped to NCHW (the official ``norm{i}``,
    which also feed the next stage): strides 4, 8, 16, 32, ``out_channels =
    embed_dims[i]`` for ``i in out_indices``.

    Structure: ``stem`` = 7x7/2 conv (no bias), norm, ReLU, then ``num_conv`` x [3x3 conv,
    norm, ReLU], all with ``embed_dims[0]`` channels (the official code hard-codes 64);
    ``stages[0].patch_embed`` is the official stem's final 2x2/2 conv and LayerNorm;
    ``stages[i > 0].patch_embed`` a 3x3/2 conv and LayerNorm. So ``frozen_stages=0``
    freezes the convolutional stem only.

    Any input size (>= 32): what is exact and what is not.

    * At sizes that are multiples of 32 nothing is padded anywhere and the outputs are the
      official model's (the reference test proves equality at 224x224).
    * Elsewhere the official model floors in its 2x2 stem conv and its token-reducing convs,
      silently dropping trailing rows/columns from the keys and values. Here each of those
      convs pads its input with zeros at the bottom/right by less than one window
      (:class:`ConvPatchEmbed`, :class:`KeyValueBranch`): every token takes part, stage ``i`` has
      ``ceil(H / 2**(i+2)) x ceil(W / 2**(i+2))`` tokens, and the image is never padded, so
      no compute is spent on padding. Because the padding is less than a window, no key is
      made of padding only (nothing needs masking).
    * Not exact: a border key whose window is partly padding aggregates its valid tokens
      with zeros (like a conv's own zero padding); there is no official value to compare it
      with. The outputs are not invariant to zero-padding the *image* (as mmdet's batch
      padding does): padded pixels pass through every conv, and tokens of partly padded
      reduction windows mix padded and valid content, so no masking can make it exact.

    Args:
        arch: ``'tiny'``, ``'small'`` (default), ``'base'`` or a dict with the keys of
            ``arch_zoo``.
        fused_attn: attention path (None: process default, see ``layers.attention``).
        **kwargs: the arguments of :class:`PyramidBackbone`. ``norm_cfg`` is the norm of the
            convolutional stem (default BN; configs for multi-GPU training use SyncBN; the
            token norms are LayerNorms as in the paper), ``act_cfg`` the activation of the
            attention branches and FFNs (default GELU). The official ImageNet training used
            ``drop_path_rate`` 0.1 / 0.2 / 0.3 for T / S / B.

    Input: ``(B, 3, H, W)``, ``H, W >= 32``. Output: tuple of ``(B, C_i, H_i, W_i)`` with
    ``H_i = ceil(H / 2**(i+2))``.
    """
    publication = Publication(  # paper, official code at the commit read, checkpoints
        'Shunted Transformer', 'Shunted Self-Attention via Multi-Scale Token Aggregation', 'CVPR 2022', 'https://arxiv.org/abs/2111.15193',  # noqa: E501
        code='https://github.com/OliverRensu/Shunted-Transformer/blob/6861101d8f4f592da79f84294f015e1e6b150351/SSA.py',  # noqa: E501
        published='Google Drive and Baidu Pan (code hazr) folders linked in the OliverRensu/Shunted-Transformer README; no direct URL: download by hand to the path the config names',  # noqa: E501
        imagenet_top1={'tiny': 79.8, 'small': 82.9, 'base': 84.0},
        imagenet_source='OliverRensu/Shunted-Transformer README, "Acc@1" (224)')
    arch_zoo = {
        # SSA.py shunted_t / shunted_s / shunted_b; num_conv: extra 3x3 convs in the stem
        'tiny':  dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1), depths=(1, 2, 4, 1),  num_conv=0),  # noqa: E501
        'small': dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1), depths=(2, 4, 12, 1), num_conv=1),  # noqa: E501
        'base':  dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1), depths=(3, 4, 24, 2), num_conv=2),  # noqa: E501
    }

    base_size_arch = 'base'
    fused_attention = True
    internal_padding = True
    reference_name = 'shunted'

    def __init__(self, arch: Union[str, dict, None] = None, *, fused_attn: Optional[bool] = None,
                 **kwargs) -> None:
        self.fused_attn = fused_attn
        super().__init__(arch, **kwargs)

    def build_stem(self) -> nn.Module:
        """7x7/2 conv, norm, ReLU, then ``num_conv`` x (3x3 conv, norm, ReLU), stride 2 (the
        official stem's last 2x2/2 conv is ``stages[0].patch_embed``)."""
        dims = self.arch_settings['embed_dims'][0]
        relu = dict(type='ReLU')  # the official stem's, whatever act_cfg says
        stem = [ConvModule(self.in_channels, dims, 7, stride=2, padding=3, bias=False,
                           norm_cfg=self.norm_cfg, act_cfg=relu)]
        stem += [ConvModule(dims, dims, 3, padding=1, bias=False, norm_cfg=self.norm_cfg,
                            act_cfg=relu) for _ in range(self.arch_settings['num_conv'])]
        return nn.Sequential(*stem)

    def build_stage(self, i: int, drop_path_rates: List[float]) -> ShuntedStage:
        s, dims = self.arch_settings, self.arch_settings['embed_dims']
        if i == 0:  # the stem's 2x2 patch merge completes stride 4
            patch_embed = ConvPatchEmbed(dims[0], dims[0], kernel_size=2, stride=2)
        else:
            patch_embed = ConvPatchEmbed(dims[i - 1], dims[i], kernel_size=3, stride=2)
        blocks = [
            ShuntedBlock(dims[i], s['num_heads'][i], s['sr_ratios'][i], s['mlp_ratios'][i], rate,
                         self.act_cfg, self.fused_attn) for rate in drop_path_rates
        ]
        return ShuntedStage(patch_embed, blocks, dims[i])

    def init_default_weights(self) -> None:
        """Official init: truncated normal (std 0.02) linear weights; conv weights normal
        with std ``sqrt(2 / fan_out)``; zero biases; norms 1 / 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_init(m, std=0.02, bias=0)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                normal_init(m, std=(2.0 / fan_out)**0.5, bias=0)
            elif isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
                constant_init(m, 1, bias=0)

    # Official SSA.py key -> mmhat key (applied in order to every key). The official stem
    # ``patch_embed1.conv`` is one Sequential of [conv, BN, ReLU] triples ending with the
    # 2x2 conv; :meth:`convert_checkpoint` maps that last index first.
    official_rename_rules = [
        (r'^patch_embed1\.conv\.(\d+)\.',
         lambda m: f'stem.{int(m[1]) // 3}.{("conv", "bn")[int(m[1]) % 3]}.'),
        (r'^patch_embed1\.norm\.', 'stages.0.patch_embed.norm.'),
        (r'^patch_embed(\d)\.', lambda m: f'stages.{int(m[1]) - 1}.patch_embed.'),
        (r'^block(\d)\.(\d+)\.', lambda m: f'stages.{int(m[1]) - 1}.blocks.{m[2]}.'),
        (r'^norm(\d)\.', lambda m: f'stages.{int(m[1]) - 1}.norm.'),
        (r'\.attn\.sr(\d)\.', lambda m: f'.attn.branches.{int(m[1]) - 1}.reduce.'),
        (r'\.attn\.norm(\d)\.', lambda m: f'.attn.branches.{int(m[1]) - 1}.norm.'),
        (r'\.attn\.kv(\d)\.', lambda m: f'.attn.branches.{int(m[1]) - 1}.kv.'),
        (r'\.attn\.local_conv(\d)\.', lambda m: f'.attn.branches.{int(m[1]) - 1}.local_conv.'),
        (r'\.mlp\.dwconv\.dwconv\.', '.ffn.dwconv.'),
        (r'\.mlp\.', '.ffn.'),
    ]
    official_drop_rules = [(r'^head\.', 'classification head')]
    # The official classifier (mean over H and W, Linear) -> mmhat.OfficialClsHead's keys.
    official_head_rules = [(r'^head\.', 'fc.')]
    # mmhat 0.1 called the FFN `mlp`, as the official code.
    legacy_rename_rules = [(r'\.mlp\.', '.ffn.')]

    @classmethod
    def official_rules(cls, state_dict: Dict[str, torch.Tensor]) -> List[Tuple]:
        """The table, plus the stem's last Sequential index (its depth varies by variant)."""
        stem_indices = [int(m[1]) for m in (re.match(r'patch_embed1\.conv\.(\d+)\.', k)
                                            for k in state_dict) if m]
        rules = list(cls.official_rename_rules)
        if stem_indices:  # the last stem index is the 2x2 patch-merging conv
            rules.insert(0, (rf'^patch_embed1\.conv\.{max(stem_indices)}\.',
                             'stages.0.patch_embed.proj.'))
        return rules
