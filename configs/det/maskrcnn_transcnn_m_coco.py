# Mask R-CNN 1x, COCO, TransCNN-Medium backbone (configs/_base_/backbones/transcnn_m.py).
_base_ = ['../_base_/det/maskrcnn_fpn_1x_coco.py', '../_base_/backbones/transcnn_m.py']
model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
