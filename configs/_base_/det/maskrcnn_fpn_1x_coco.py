# Mask R-CNN + FPN, COCO, 1x with PVT's schedule (../schedules/pvt_adamw_1x.py: AdamW lr 2e-4,
# weight decay 1e-4, 12 epochs, steps 8/11, 500-iteration warm-up, batch 16), 1333x800. A
# config that uses this base sets the backbone (with `_delete_=True`) and the neck's
# `in_channels`.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    '../schedules/pvt_adamw_1x.py',
    'mmdet::_base_/default_runtime.py',
]
train_dataloader = dict(batch_size=2, num_workers=2)  # x 8 GPUs = 16
