# HAT-Net-Medium on ImageNet-1k (224x224): the authors' classifier from their checkpoint,
# loaded whole by the backbone and the head (docs/imagenet.md). Evaluate with
#   python tools/test.py configs/cls/hatnet_m_in1k.py CHECKPOINT
_base_ = ['../_base_/cls/hatnet.py', '../_base_/backbones/hatnet_m.py']
model = dict(
    backbone={{_base_.backbone}},
    head=dict(in_channels=512, init_cfg={{_base_.backbone.init_cfg}}))
