# Shunted ImageNet classifier for mmpretrain, as the official model is at 224x224: the backbone,
# then mmhat.OfficialClsHead, which computes the official head and reads its weights from the
# official checkpoint. configs/cls/shunted_*_in1k.py add the variant's backbone base and point the
# head at the same checkpoint as the backbone.
_base_ = ['./imagenet_224.py']
model = dict(
    type='ImageClassifier',
    data_preprocessor={{_base_.data_preprocessor}},
    backbone=dict(type='mmhat.ShuntedTransformer'),  # replaced by the variant's backbone base
    neck=None,
    head=dict(
        type='mmhat.OfficialClsHead',
        family='ShuntedTransformer',
        num_classes=1000,
        # the official classifier: mean over H and W, Linear (stage 4 ends with its norm)
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, 5)))
