# Shunted-S with the authors' ImageNet checkpoint, published only on Google Drive / Baidu Pan:
# download it to checkpoints/shunted_s.pth (docs/model_zoo.md, "Checkpoints").
# The backbone of every *_shunted_s_* config, used as
#   model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
# shunted_{t,b}.py inherit this file and change only arch, checkpoint, drop path, channels.
#
# Drop path: the authors have released no detection or segmentation settings, so 0.1 for
# the small-size variants T and S (ImageNet: T 0.1, S 0.2), raised with model size for B
# (0.2; ImageNet 0.3), as Swin's COCO configs do (T 0.2 -> S/B 0.3).
# Position encodings: none. Shunted has no position parameters (position comes implicitly
# from zero-padded depthwise convs, `attn.*.local_conv` and `mlp.dwconv`, as in PVTv2, whose
# mmdet configs decay them), so only norms and biases are exempt from weight decay.
backbone = dict(
    _delete_=True,  # replaces the ResNet of the mmdet/mmseg base model
    type='mmhat.ShuntedTransformer',
    arch='small',
    drop_path_rate=0.1,
    norm_cfg=dict(type='SyncBN'),  # the BatchNorms of the conv stem, synchronised across GPUs
    init_cfg=dict(type='Pretrained', checkpoint='checkpoints/shunted_s.pth'))
backbone_channels = [64, 128, 256, 512]
