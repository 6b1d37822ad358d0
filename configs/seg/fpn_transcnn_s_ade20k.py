# Semantic FPN 80k, ADE20K 512x512, TransCNN-Small backbone (ImageNet checkpoint of the
# authors, release v1.0). TransCNN uses BatchNorm: SyncBN for multi-GPU training.
_base_ = ['../_base_/seg/fpn_80k_ade20k.py']
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
