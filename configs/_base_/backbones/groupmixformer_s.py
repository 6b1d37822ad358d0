# GroupMixFormer-S with the authors' ImageNet checkpoint, published only on OneDrive:
# download it to checkpoints/groupmixformer_s.pth (docs/model_zoo.md, "Checkpoints").
# The backbone of every *_groupmixformer_s_* config, used as
#   model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
#   optim_wrapper = dict(paramwise_cfg=dict(custom_keys={{_base_.custom_keys}}))
# groupmixformer_{m,t,b,l}.py inherit this file and change only arch, checkpoint, drop path,
# channels.
#
# Drop path: the authors have released no detection or segmentation settings (their
# downstream code is "WIP"), so 0.1 for the small-size variants M, T and S (the ImageNet value
# of M and T; S used 0.2 on ImageNet), raised with model size for B (0.2) and L (0.3), as
# Swin's COCO configs do (T 0.2 -> S/B 0.3). The ImageNet values (yaml: M 0.1, T 0.1, S 0.2,
# B 0.5, L 0.1) are for 300 epochs from scratch, not for fine-tuning.
backbone = dict(
    _delete_=True,  # replaces the ResNet of the mmdet/mmseg base model
    type='mmhat.GroupMixFormer',
    arch='small',
    drop_path_rate=0.1,
    norm_cfg=dict(type='SyncBN'),  # BatchNorm family: synchronised across GPUs
    init_cfg=dict(type='Pretrained', checkpoint='checkpoints/groupmixformer_s.pth'))
backbone_channels = [80, 160, 320, 320]
# No weight decay on the position encodings: the conditional one of every block (`cpe`, a
# depthwise 3x3 conv) and the convolutional relative one in the attention (`attn.crpe`),
# as Swin's configs exempt their position tables. Norms and biases: see the recipe bases.
custom_keys = {'.cpe.': dict(decay_mult=0.0), '.crpe.': dict(decay_mult=0.0)}
