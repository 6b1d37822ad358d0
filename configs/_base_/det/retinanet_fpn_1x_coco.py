# RetinaNet + FPN, COCO, 1x with PVT's schedule (../schedules/pvt_adamw_1x.py) at lr 1e-4,
# 1333x800. A config that uses this base sets the backbone and the neck's `in_channels`.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    '../schedules/pvt_adamw_1x.py',
    'mmdet::_base_/default_runtime.py',
]
optim_wrapper = dict(optimizer=dict(lr=1e-4))
train_dataloader = dict(batch_size=2, num_workers=2)  # x 8 GPUs = 16
