# HAT-Net-Tiny with the authors' ImageNet checkpoint (GitHub release v2.0): hatnet_s.py with
# the tiny arch, its checkpoint, drop path and channels.
_base_ = './hatnet_s.py'
backbone = dict(
    arch='tiny',
    drop_path_rate=0.1,  # 0.1 as Small (12.7 M parameters, 13 blocks)
    init_cfg=dict(checkpoint='https://github.com/yun-liu/HAT-Net/releases/download/v2.0/HAT-Net_Tiny.pth'))
backbone_channels = [48, 96, 240, 384]
