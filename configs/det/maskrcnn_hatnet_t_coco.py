# Mask R-CNN 1x, COCO, HAT-Net-Tiny backbone (configs/_base_/backbones/hatnet_t.py).
_base_ = ['../_base_/det/maskrcnn_fpn_1x_coco.py', '../_base_/backbones/hatnet_t.py']
model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
