# TransCNN-Small with the authors' ImageNet checkpoint (GitHub release v1.0, 256x256; the
# TransCNN README linked it under yun-liu/TransCNN, the repository since renamed
# yun-liu/HAT-Net, which serves the same release).
# The backbone of every *_transcnn_s_* config, used as
#   model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
# transcnn_{t,m,l}.py inherit this file and change only arch, checkpoint, drop path, channels.
#
# Drop path: the authors give none for detection or segmentation (PVT recipe, 0.1), so 0.1
# for Tiny and Small, raised with model size for Medium (0.2) and Large (0.3), as Swin's COCO
# configs do (T 0.2 -> S/B 0.3).
backbone = dict(
    _delete_=True,  # replaces the ResNet of the mmdet/mmseg base model
    type='mmhat.TransCNN',
    arch='small',
    drop_path_rate=0.1,
    norm_cfg=dict(type='SyncBN'),  # BatchNorm family: synchronised across GPUs
    init_cfg=dict(type='Pretrained', checkpoint='https://github.com/yun-liu/HAT-Net/releases/download/v1.0/TransCNN-Small.pth'))
backbone_channels = [64, 128, 256, 512]
