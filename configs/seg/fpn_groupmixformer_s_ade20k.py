# Semantic FPN 80k, ADE20K 512x512, GroupMixFormer-S backbone. The ImageNet checkpoint is published
# only on the authors' OneDrive (README: "Model zoo"): download it to checkpoints/groupmixformer_s.pth.
_base_ = ['../_base_/seg/fpn_80k_ade20k.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmhat.GroupMixFormer',
        arch='small',
        drop_path_rate=0.1,
        norm_cfg=dict(type='SyncBN'),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/groupmixformer_s.pth')),
    neck=dict(in_channels=[80, 160, 320, 320]))
