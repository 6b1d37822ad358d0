# TransCNN ImageNet classifier for mmpretrain, as the official model is at 256x256: the backbone,
# then mmhat.OfficialClsHead, which computes the official head and reads its weights from the
# official checkpoint. configs/cls/transcnn_*_in1k.py add the variant's backbone base and point the
# head at the same checkpoint as the backbone.
_base_ = ['./imagenet_256.py']
model = dict(
    type='ImageClassifier',
    data_preprocessor={{_base_.data_preprocessor}},
    backbone=dict(type='mmhat.TransCNN'),  # replaced by the variant's backbone base
    neck=None,
    head=dict(
        type='mmhat.OfficialClsHead',
        family='TransCNN',
        num_classes=1000,
        dropout=0.2,  # the official classifier: pool, Dropout(0.2), Linear
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, 5)))
