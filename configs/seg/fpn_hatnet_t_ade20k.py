# Semantic FPN 80k, ADE20K 512x512, HAT-Net-Tiny backbone (configs/_base_/backbones/hatnet_t.py).
_base_ = ['../_base_/seg/fpn_80k_ade20k.py', '../_base_/backbones/hatnet_t.py']
model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
