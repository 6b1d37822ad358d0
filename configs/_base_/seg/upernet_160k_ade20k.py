# UperNet, ADE20K, 160k iterations with mmseg's Swin recipe: 512x512 crops, AdamW lr 6e-5,
# betas (0.9, 0.999), weight decay 0.01, 1500-iteration linear warm-up then poly decay
# (power 1.0), 16 images per batch (8 GPUs x 2), auxiliary FCN head on stage 3 (loss weight
# 0.4). Users of this base set the backbone, the decode head's `in_channels` (the backbone's
# out_channels) and the auxiliary head's (out_channels[2]).
_base_ = [
    'mmseg::_base_/models/upernet_swin.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=150),
    auxiliary_head=dict(num_classes=150))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    # no weight decay on norms (by type: every family's norm layers); backbone bases add
    # their position encodings
    paramwise_cfg=dict(norm_decay_mult=0.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
