# HAT-Net-Small with the authors' ImageNet checkpoint (GitHub release v2.0).
# The backbone of every *_hatnet_s_* config, used as
#   model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
backbone = dict(
    _delete_=True,  # replaces the ResNet of the mmdet/mmseg base model
    type='mmhat.HATNet',
    arch='small',
    drop_path_rate=0.1,
    init_cfg=dict(type='Pretrained', checkpoint='https://github.com/yun-liu/HAT-Net/releases/download/v2.0/HAT-Net_Small.pth'))
backbone_channels = [64, 128, 320, 512]
