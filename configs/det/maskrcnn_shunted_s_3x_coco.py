# Mask R-CNN 3x with multi-scale training, COCO, Shunted-S backbone (configs/_base_/backbones/shunted_s.py).
_base_ = ['../_base_/det/maskrcnn_fpn_ms-crop-3x_coco.py', '../_base_/backbones/shunted_s.py']
model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
