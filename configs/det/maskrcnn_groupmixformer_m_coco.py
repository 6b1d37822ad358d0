# Mask R-CNN 1x, COCO, GroupMixFormer-M backbone (configs/_base_/backbones/groupmixformer_m.py).
_base_ = ['../_base_/det/maskrcnn_fpn_1x_coco.py', '../_base_/backbones/groupmixformer_m.py']
model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={{_base_.custom_keys}}))
