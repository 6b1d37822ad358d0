# TransCNN-Small with the authors' ImageNet checkpoint (GitHub release v1.0, 256x256).
# The backbone of every *_transcnn_s_* config, used as
#   model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
backbone = dict(
    _delete_=True,  # replaces the ResNet of the mmdet/mmseg base model
    type='mmhat.TransCNN',
    arch='small',
    drop_path_rate=0.1,
    norm_cfg=dict(type='SyncBN'),  # BatchNorm family: synchronised across GPUs
    init_cfg=dict(type='Pretrained', checkpoint='https://github.com/yun-liu/HAT-Net/releases/download/v1.0/TransCNN-Small.pth'))
backbone_channels = [64, 128, 256, 512]
