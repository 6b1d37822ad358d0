# UperNet 160k, ADE20K 512x512, GroupMixFormer-S backbone (configs/_base_/backbones/groupmixformer_s.py).
_base_ = ['../_base_/seg/upernet_160k_ade20k.py', '../_base_/backbones/groupmixformer_s.py']
model = dict(
    backbone={{_base_.backbone}},
    decode_head=dict(in_channels={{_base_.backbone_channels}}),
    auxiliary_head=dict(in_channels=320))  # backbone_channels[2]
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={{_base_.custom_keys}}))
