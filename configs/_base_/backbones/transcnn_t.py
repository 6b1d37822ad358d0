# TransCNN-Tiny with the authors' ImageNet checkpoint (GitHub release v1.0, 256x256):
# transcnn_s.py with the tiny arch, its checkpoint, drop path and channels.
_base_ = './transcnn_s.py'
backbone = dict(
    arch='tiny',
    drop_path_rate=0.1,  # 0.1 as Small (13.3 M parameters, 10 blocks)
    init_cfg=dict(checkpoint='https://github.com/yun-liu/HAT-Net/releases/download/v1.0/TransCNN-Tiny.pth'))
backbone_channels = [64, 128, 256, 512]
