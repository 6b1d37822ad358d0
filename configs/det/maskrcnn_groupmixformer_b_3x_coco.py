# Mask R-CNN 3x with multi-scale training, COCO, GroupMixFormer-B backbone (configs/_base_/backbones/groupmixformer_b.py).
_base_ = ['../_base_/det/maskrcnn_fpn_ms-crop-3x_coco.py', '../_base_/backbones/groupmixformer_b.py']
model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={{_base_.custom_keys}}))
