# Semantic FPN 80k, ADE20K 512x512, Shunted-T backbone (configs/_base_/backbones/shunted_t.py).
_base_ = ['../_base_/seg/fpn_80k_ade20k.py', '../_base_/backbones/shunted_t.py']
model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
