# Mask R-CNN 1x, COCO, HAT-Net-Small backbone (ImageNet checkpoint of the authors).
_base_ = ['../_base_/det/maskrcnn_fpn_1x_coco.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmhat.HATNet',
        arch='small',
        drop_path_rate=0.1,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://github.com/yun-liu/HAT-Net/releases/download/v2.0/HAT-Net_Small.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))
