# TransCNN-Medium with the authors' ImageNet checkpoint (GitHub release v1.0, 256x256):
# transcnn_s.py with the medium arch, its checkpoint, drop path and channels.
_base_ = './transcnn_s.py'
backbone = dict(
    arch='medium',
    drop_path_rate=0.2,  # 0.2: 48.3 M parameters, 22 blocks (see transcnn_s.py)
    init_cfg=dict(checkpoint='https://github.com/yun-liu/HAT-Net/releases/download/v1.0/TransCNN-Medium.pth'))
backbone_channels = [64, 128, 320, 640]
