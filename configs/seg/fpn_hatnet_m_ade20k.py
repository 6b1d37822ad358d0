# Semantic FPN 80k, ADE20K 512x512, HAT-Net-Medium backbone (configs/_base_/backbones/hatnet_m.py).
_base_ = ['../_base_/seg/fpn_80k_ade20k.py', '../_base_/backbones/hatnet_m.py']
model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
