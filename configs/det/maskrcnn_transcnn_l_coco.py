# Mask R-CNN 1x, COCO, TransCNN-Large backbone (configs/_base_/backbones/transcnn_l.py).
_base_ = ['../_base_/det/maskrcnn_fpn_1x_coco.py', '../_base_/backbones/transcnn_l.py']
model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
