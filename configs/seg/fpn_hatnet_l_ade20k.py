# Semantic FPN 80k, ADE20K 512x512, HAT-Net-Large backbone (configs/_base_/backbones/hatnet_l.py).
_base_ = ['../_base_/seg/fpn_80k_ade20k.py', '../_base_/backbones/hatnet_l.py']
model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
