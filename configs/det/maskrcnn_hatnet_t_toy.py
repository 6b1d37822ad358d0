# Mask R-CNN + HAT-Net-Tiny on the synthetic toy shapes of tools/make_toy_coco.py: the COCO
# recipe of maskrcnn_hatnet_s_coco.py shrunk until training from scratch, evaluation and a
# picture fit in minutes on a 2-core CPU (tools/demo_toy.py). What differs from the COCO
# recipe: the tiny backbone without a checkpoint (nothing is downloaded), 3 classes, 160x160
# images, narrower heads, a 5-epoch schedule with a higher lr, a checkpoint each epoch.
_base_ = ['./maskrcnn_hatnet_s_coco.py']

data_root = 'data/toy_coco/'  # --data-root replaces it (and the evaluator's ann_file)
classes = ('circle', 'square', 'triangle')
metainfo = dict(classes=classes, palette=[(220, 20, 60), (0, 130, 230), (20, 200, 60)])
image_size = (160, 160)  # what make_toy_coco.py writes: resizing is a no-op
max_epochs = 5

# 128 instead of 256 channels after the backbone, and fewer proposals and RoIs per image
# (a toy image has at most 4 objects): a training step measured 1.0 s instead of 2.9 s
head_channels = 128
model = dict(
    backbone=dict(arch='tiny', drop_path_rate=0.0, init_cfg=None),
    neck=dict(in_channels=[48, 96, 240, 384], out_channels=head_channels),
    rpn_head=dict(in_channels=head_channels, feat_channels=head_channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=head_channels),
        bbox_head=dict(in_channels=head_channels, num_classes=len(classes)),
        mask_roi_extractor=dict(out_channels=head_channels),
        mask_head=dict(in_channels=head_channels, conv_out_channels=head_channels,
                       num_classes=len(classes))),
    train_cfg=dict(rpn_proposal=dict(nms_pre=500, max_per_img=200),
                   rcnn=dict(sampler=dict(num=128))))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
# worker processes cost more than they save on 2 cores and small PNGs
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json',
                     metric=['bbox', 'segm'])
test_evaluator = val_evaluator

# 60 iterations per epoch. Measured (2 cores, from scratch, constant lr 1e-3 after warm-up):
# bbox mAP 0.38 after epoch 2, 0.68 after epoch 4; the last epoch runs at lr 1e-4.
# Evaluate at the end only (the loop always validates the last epoch, also when
# train_cfg.max_epochs is overridden).
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(optimizer=dict(lr=1e-3), clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=60),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[max_epochs - 1], gamma=0.1),
]
default_hooks = dict(logger=dict(interval=10),
                     checkpoint=dict(interval=1, max_keep_ckpts=3))
# an epoch's randomness depends on (seed, epoch) only, so a resumed run repeats the
# uninterrupted one exactly
custom_hooks = [dict(type='mmhat.EpochSeedHook')]
randomness = dict(seed=0, deterministic=True)
