# ImageNet-1k classification with mmpretrain (configs/cls/*): the authors' evaluation and a
# plain fine-tuning recipe. Layout (docs/imagenet.md): data/imagenet/{train,val}/ with
# meta/{train,val}.txt ("<file> <label>" per line), mmpretrain's ImageNet dataset.
#
# Evaluation as the authors validated (DeiT/PVT's `build_transform`, which HAT-Net, TransCNN,
# Shunted and GroupMixFormer all use): bicubic resize of the short side to int(256/224 * S),
# centre crop S, ImageNet mean/std; S = 224 here (imagenet_256.py: TransCNN's 256).
#
# Training: a short fine-tuning recipe (random resized crop, flip, AdamW, cosine), not the
# authors' 300-epoch DeiT recipe (RandAugment, Mixup/CutMix, label smoothing, EMA...).
default_scope = 'mmpretrain'
crop_size = 224
resize_size = 256  # int(256 / 224 * crop_size)
data_root = 'data/imagenet'
dataset_type = 'ImageNet'

data_preprocessor = dict(
    num_classes=1000,
    mean=[123.675, 116.28, 103.53],  # ImageNet mean/std, RGB, 0-255
    std=[58.395, 57.12, 57.375],
    to_rgb=True)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=crop_size, backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=resize_size, edge='short', backend='pillow',
         interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=crop_size),
    dict(type='PackInputs'),
]

train_dataloader = dict(
    batch_size=64,
    num_workers=5,
    dataset=dict(type=dataset_type, data_root=data_root, split='train', pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=64,
    num_workers=5,
    dataset=dict(type=dataset_type, data_root=data_root, split='val', pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1, 5))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

# Fine-tuning: 30 epochs, AdamW at DeiT's 5e-4 per 512 images, cosine after 1 warm-up epoch.
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=5e-4 * 512 / 512, weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
    clip_grad=dict(max_norm=5.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=1, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=1),
]
train_cfg = dict(by_epoch=True, max_epochs=30, val_interval=1)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=512)  # 8 GPUs x 64

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='VisualizationHook', enable=False))
# Checkpoints that mmhat's safe loader (tools/test.py, load_from, --resume) reads on every torch,
# also when mmpretrain's own train.py writes them (mmengine would pickle HistoryBuffer's
# methods as getattr references, which no safe loader admits).
custom_hooks = [dict(type='mmhat.ResumeCompatHook')]
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='UniversalVisualizer', vis_backends=vis_backends)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
