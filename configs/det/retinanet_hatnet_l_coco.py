# RetinaNet 1x, COCO, HAT-Net-Large backbone (configs/_base_/backbones/hatnet_l.py).
_base_ = ['../_base_/det/retinanet_fpn_1x_coco.py', '../_base_/backbones/hatnet_l.py']
model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
