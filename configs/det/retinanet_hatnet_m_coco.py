# RetinaNet 1x, COCO, HAT-Net-Medium backbone (configs/_base_/backbones/hatnet_m.py).
_base_ = ['../_base_/det/retinanet_fpn_1x_coco.py', '../_base_/backbones/hatnet_m.py']
model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
