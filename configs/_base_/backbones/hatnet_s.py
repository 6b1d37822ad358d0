# HAT-Net-Small with the authors' ImageNet checkpoint (GitHub release v2.0).
# The backbone of every *_hatnet_s_* config, used as
#   model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
# hatnet_{t,m,l}.py inherit this file and change only arch, checkpoint, drop path, channels.
#
# Drop path: the authors give none for detection or segmentation (their training "exactly
# follows PVT", whose COCO/ADE20K backbones use 0.1), so 0.1 for Tiny and Small, raised with
# model size for Medium (0.2) and Large (0.3), as Swin's COCO configs do (T 0.2 -> S/B 0.3).
# GroupNorm(1) everywhere: no BatchNorm, so nothing to synchronise across GPUs.
backbone = dict(
    _delete_=True,  # replaces the ResNet of the mmdet/mmseg base model
    type='mmhat.HATNet',
    arch='small',
    drop_path_rate=0.1,
    init_cfg=dict(type='Pretrained', checkpoint='https://github.com/yun-liu/HAT-Net/releases/download/v2.0/HAT-Net_Small.pth'))
backbone_channels = [64, 128, 320, 512]
