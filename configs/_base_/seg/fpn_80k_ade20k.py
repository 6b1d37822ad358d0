# Semantic FPN, ADE20K, 80k iterations with the PVT recipe: 512x512 crops, AdamW lr 1e-4,
# weight decay 1e-4, poly decay (power 0.9), 16 images per batch (4 GPUs x 4). Users of
# this base set the backbone and the neck's `in_channels`.
_base_ = [
    'mmseg::_base_/models/fpn_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py',
]
crop_size = (512, 512)
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    # mmseg's base injects an ImageNet ResNet here; our backbones load their own init_cfg.
    pretrained=None,
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=150))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, weight_decay=1e-4),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
    clip_grad=None)
param_scheduler = [
    dict(type='PolyLR', power=0.9, eta_min=0.0, begin=0, end=80000, by_epoch=False),
]
train_dataloader = dict(batch_size=4, num_workers=4)
