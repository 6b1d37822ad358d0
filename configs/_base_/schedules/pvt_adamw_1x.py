# PVT's 1x detection schedule, which the HAT-Net authors followed: AdamW with weight decay
# 1e-4 (none on norms and biases), 12 epochs, lr steps at 8 and 11, 500-iteration linear
# warm-up, for 16 images per batch (the det bases: 8 GPUs x 2). Mask R-CNN uses lr 2e-4;
# RetinaNet's base lowers it to 1e-4.
_base_ = ['mmdet::_base_/schedules/schedule_1x.py']

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=2e-4, weight_decay=1e-4),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
auto_scale_lr = dict(enable=False, base_batch_size=16)
