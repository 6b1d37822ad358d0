# TransCNN-Tiny on ImageNet-1k (256x256): the authors' classifier from their checkpoint,
# loaded whole by the backbone and the head (docs/imagenet.md). Evaluate with
#   python tools/test.py configs/cls/transcnn_t_in1k.py CHECKPOINT
_base_ = ['../_base_/cls/transcnn.py', '../_base_/backbones/transcnn_t.py']
model = dict(
    backbone={{_base_.backbone}},
    head=dict(in_channels=512, init_cfg={{_base_.backbone.init_cfg}}))
