# GroupMixFormer-S with the authors' ImageNet checkpoint, published only on OneDrive:
# download it to checkpoints/groupmixformer_s.pth (README: "Model zoo").
# The backbone of every *_groupmixformer_s_* config, used as
#   model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
backbone = dict(
    _delete_=True,  # replaces the ResNet of the mmdet/mmseg base model
    type='mmhat.GroupMixFormer',
    arch='small',
    drop_path_rate=0.1,
    norm_cfg=dict(type='SyncBN'),  # BatchNorm family: synchronised across GPUs
    init_cfg=dict(type='Pretrained', checkpoint='checkpoints/groupmixformer_s.pth'))
backbone_channels = [80, 160, 320, 320]
