# HAT-Net-Large with the authors' ImageNet checkpoint (GitHub release v2.0): hatnet_s.py with
# the large arch, its checkpoint, drop path and channels.
_base_ = './hatnet_s.py'
backbone = dict(
    arch='large',
    drop_path_rate=0.3,  # 0.3: 63.1 M parameters, 41 blocks (see hatnet_s.py)
    init_cfg=dict(checkpoint='https://github.com/yun-liu/HAT-Net/releases/download/v2.0/HAT-Net_Large.pth'))
backbone_channels = [64, 128, 320, 640]
