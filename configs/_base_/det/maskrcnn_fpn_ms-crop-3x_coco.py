# Mask R-CNN + FPN, COCO, 3x with multi-scale training: mmdet's Swin recipe, inherited from
# its config as is: AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05, 36 epochs, lr steps
# at 27 and 33, 1000-iteration linear warm-up, shorter side 480-800 (long side <= 1333) with
# the DETR crop augmentation, 16 images per batch (8 GPUs x 2). A config that uses this base
# sets the backbone (with `_delete_=True`) and the neck's `in_channels`.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py']

# the Swin-T checkpoint variable of that config; our backbones load their own init_cfg
pretrained = None
optim_wrapper = dict(
    # No weight decay on norms, selected by type so that every norm layer of every family
    # (GroupNorm, BatchNorm, LayerNorm, whatever its name) is covered; Swin's config selects
    # by the substring 'norm' and its position tables by name (backbone bases add ours).
    paramwise_cfg=dict(_delete_=True, norm_decay_mult=0.0))
