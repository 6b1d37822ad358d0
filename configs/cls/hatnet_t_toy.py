# HAT-Net-Tiny classifier on the toy ImageNet-format set (tools/make_toy_imagenet.py: three
# shapes, labels 0-2): fine-tuning and evaluation in a CPU minute, to check the set-up. Not
# an ImageNet result. Trains from scratch; to fine-tune from an ImageNet checkpoint, inherit this
# file and set model = dict(backbone=dict(init_cfg=dict(_delete_=True, type='Pretrained',
# checkpoint=PATH))).
_base_ = ['./hatnet_t_in1k.py']
data_root = 'data/toy_imagenet'
crop_size = 96
model = dict(
    data_preprocessor=dict(num_classes=3),
    backbone=dict(init_cfg=None),
    # a new 3-class classifier, drawn as the authors draw theirs
    head=dict(num_classes=3, topk=(1, ), init_cfg=dict(_delete_=True, type='TruncNormal',
                                                       layer='Linear', std=0.02, bias=0.)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=crop_size, crop_ratio_range=(0.6, 1.0), backend='pillow',
         interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=110, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=crop_size),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=8, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(batch_size=12, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(lr=1e-4, weight_decay=0.01))
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=True)]
train_cfg = dict(by_epoch=True, max_epochs=4, val_interval=4)
default_hooks = dict(logger=dict(type='LoggerHook', interval=1),
                     checkpoint=dict(type='CheckpointHook', interval=4, max_keep_ckpts=1))
randomness = dict(seed=0, deterministic=False)
auto_scale_lr = None
