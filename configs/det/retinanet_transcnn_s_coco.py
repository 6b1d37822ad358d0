# RetinaNet 1x, COCO, TransCNN-Small backbone (ImageNet checkpoint of the authors, release v1.0).
# TransCNN uses BatchNorm: SyncBN for multi-GPU training.
_base_ = ['../_base_/det/retinanet_fpn_1x_coco.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmhat.TransCNN',
        arch='small',
        drop_path_rate=0.1,
        norm_cfg=dict(type='SyncBN'),
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://github.com/yun-liu/HAT-Net/releases/download/v1.0/TransCNN-Small.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))
