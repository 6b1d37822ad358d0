# HAT-Net-Medium with the authors' ImageNet checkpoint (GitHub release v2.0): hatnet_s.py with
# the medium arch, its checkpoint, drop path and channels.
_base_ = './hatnet_s.py'
backbone = dict(
    arch='medium',
    drop_path_rate=0.2,  # 0.2: 42.9 M parameters, 30 blocks (see hatnet_s.py)
    init_cfg=dict(checkpoint='https://github.com/yun-liu/HAT-Net/releases/download/v2.0/HAT-Net_Medium.pth'))
backbone_channels = [64, 128, 320, 512]
