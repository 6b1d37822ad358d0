# RetinaNet 1x, COCO, Shunted-B backbone (configs/_base_/backbones/shunted_b.py).
_base_ = ['../_base_/det/retinanet_fpn_1x_coco.py', '../_base_/backbones/shunted_b.py']
model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
