# Shunted-S with the authors' ImageNet checkpoint, published only on Google Drive / Baidu Pan:
# download it to checkpoints/shunted_s.pth (README: "Model zoo").
# The backbone of every *_shunted_s_* config, used as
#   model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
backbone = dict(
    _delete_=True,  # replaces the ResNet of the mmdet/mmseg base model
    type='mmhat.ShuntedTransformer',
    arch='small',
    drop_path_rate=0.1,
    norm_cfg=dict(type='SyncBN'),  # BatchNorm family: synchronised across GPUs
    init_cfg=dict(type='Pretrained', checkpoint='checkpoints/shunted_s.pth'))
backbone_channels = [64, 128, 256, 512]
