# Mask R-CNN + FPN, COCO, 1x with the PVT recipe that HAT-Net's authors followed:
# AdamW lr 2e-4, weight decay 1e-4, 12 epochs, lr steps at 8 and 11, 500-iteration linear
# warm-up, 1333x800, 16 images per batch (8 GPUs x 2). A config that uses this base sets
# the backbone (with `_delete_=True`) and the neck's `in_channels`.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=2e-4, weight_decay=1e-4),
    # no weight decay on norms and biases
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
train_dataloader = dict(batch_size=2, num_workers=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
