# RetinaNet 1x, COCO, Shunted-S backbone. The ImageNet checkpoint is published only on
# the authors' Google Drive / Baidu Pan (README: "Model zoo"): download it to checkpoints/shunted_s.pth.
_base_ = ['../_base_/det/retinanet_fpn_1x_coco.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmhat.ShuntedTransformer',
        arch='small',
        drop_path_rate=0.1,
        norm_cfg=dict(type='SyncBN'),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/shunted_s.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))
