"""TransCNN: Transformer in Convolutional Neural Networks (HAT-Net's first version).

Paper: Yun Liu, Guolei Sun, Yu Qiu, Le Zhang, Ajad Chhatkuli, Luc Van Gool,
"Transformer in Convolutional Neural Networks", arXiv 2106.03180 v1/v2. Official code:
yun-liu/HAT-Net at commit 0bd7463, ``TransCNN.py`` (the repository states no licence);
released ImageNet checkpoints ``TransCNN-{Tiny,Small,Medium,Large}.pth`` (GitHub release
``v1.0``, 256x256).

TransCNN is HAT-Net's code with three differences, and this file holds only those:
BatchNorm instead of GroupNorm(1); the two-branch downsampling block (TDB); and a
MobileNetV2-style inverted residual (a norm after every conv, no pre-norm). The H-MHSA,
block, stage and any-size padding are :mod:`.hatnet`'s.
"""
import torch
from mmcv.cnn import build_activation_layer, build_norm_layer
from torch import nn

from mmhat.registry import MODELS
from ..layers import PointwiseConv2d, ceil_pool2d
from .base import Publication
from .hatnet import HATNet


class TwoBranchDownsample(nn.Module):
    """TransCNN's downsampling block (TDB), stride 2.

    ``act(norm1(conv3x3_s2(x)) + norm2(conv1x1(maxpool2x2(x))))``. The max pool uses
    ``ceil_mode`` so that both branches have ``ceil(H/2)`` rows at odd sizes (the official
    floor-mode pool only works at even sizes, where both agree).
    """

    def __init__(self, in_dims: int, out_dims: int, norm_cfg: dict, act_cfg: dict) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dims, out_dims, 3, stride=2, padding=1)
        self.norm1 = build_norm_layer(norm_cfg, out_dims)[1]
        self.residual = PointwiseConv2d(in_dims, out_dims)
        self.norm2 = build_norm_layer(norm_cfg, out_dims)[1]
        self.act = build_activation_layer(act_cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, ceil(H/2), ceil(W/2))``."""
        pooled = ceil_pool2d(x, 2, 'max')  # (B, C_in, ceil(H/2), ceil(W/2))
        return self.act(self.norm1(self.conv(x)) + self.norm2(self.residual(pooled)))


@MODELS.register_module()
class TransCNN(HATNet):
    """TransCNN backbone (see :class:`HATNet` for the arguments and the output contract).

    ``norm_cfg`` defaults to BatchNorm (eps 1e-5); configs for multi-GPU training set
    ``dict(type='SyncBN')``. With BatchNorm, ``norm_eval=True`` keeps the ImageNet
    statistics frozen during fine-tuning. The official checkpoints are trained at 256x256.
    """
    arch_zoo = {
        'tiny':   dict(embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8),  mlp_ratios=(4, 4, 4, 4), grid_sizes=(8, 8, 8, 1), ds_ratios=(8, 4, 2, 1), depths=(2, 2, 4, 2),  kernel_sizes=(5, 3, 5, 3), stem_channels=16),  # noqa: E501
        'small':  dict(embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8),  mlp_ratios=(4, 4, 6, 6), grid_sizes=(8, 8, 8, 1), ds_ratios=(8, 4, 2, 1), depths=(3, 4, 8, 3),  kernel_sizes=(5, 3, 5, 3), stem_channels=16),  # noqa: E501
        'medium': dict(embed_dims=(64, 128, 320, 640), num_heads=(1, 2, 5, 10), mlp_ratios=(4, 4, 6, 6), grid_sizes=(8, 8, 8, 1), ds_ratios=(8, 4, 2, 1), depths=(3, 4, 12, 3), kernel_sizes=(5, 3, 5, 3), stem_channels=16),  # noqa: E501
        'large':  dict(embed_dims=(64, 128, 384, 768), num_heads=(1, 2, 6, 12), mlp_ratios=(4, 4, 6, 6), grid_sizes=(8, 8, 8, 1), ds_ratios=(8, 4, 2, 1), depths=(3, 4, 16, 3), kernel_sizes=(5, 3, 5, 3), stem_channels=16),  # noqa: E501
    }
    pretrain_size = 256
    default_norm_cfg = dict(type='BN')
    reference_name = 'transcnn'
    ffn_pre_norm, ffn_inner_norms = False, True
    folded_norms = True  # each inverted residual's BatchNorm after its expanding 1x1 conv
    publication = Publication(  # paper, official code at the commit read, checkpoints
        'TransCNN', 'Transformer in Convolutional Neural Networks', 'arXiv 2021, the first version of the HAT-Net paper', 'https://arxiv.org/abs/2106.03180v2',  # noqa: E501
        code='https://github.com/yun-liu/HAT-Net/blob/0bd7463ed11177b01b5fb59946537bc8d0c635cb/TransCNN.py',  # noqa: E501
        published='GitHub release v1.0 of yun-liu/TransCNN, the repository now named yun-liu/HAT-Net (the configs download it from there); also Google Drive, linked in its README at that commit',  # noqa: E501
        imagenet_top1={'tiny': 80.4, 'small': 83.1, 'medium': 83.8, 'large': 84.2},
        imagenet_source='yun-liu/HAT-Net README at 0bd7463 (then TransCNN), "Acc@1" (256x256)')

    def build_downsample(self, in_dims: int, out_dims: int) -> nn.Module:
        """The two-branch downsampling block (TDB)."""
        return TwoBranchDownsample(in_dims, out_dims, self.norm_cfg, self.act_cfg)

    # Official TransCNN.py key -> mmhat key; the TDB keeps its official names.
    official_rename_rules = HATNet.official_rename_rules[:5] + [
        (r'\.conv\.conv1\.0\.', '.ffn.expand.'),
        (r'\.conv\.conv1\.1\.', '.ffn.expand_norm.'),
        (r'\.conv\.conv2\.0\.', '.ffn.dwconv.'),
        (r'\.conv\.conv2\.1\.', '.ffn.dw_norm.'),
        (r'\.conv\.conv3\.0\.', '.ffn.project.'),
        (r'\.conv\.conv3\.1\.', '.ffn.out_norm.'),
    ]
    official_drop_rules = [(r'^classifier\.', 'classification head')]
    # official_head_rules: HAT-Net's (the same pool, Dropout, Linear under `classifier`)
