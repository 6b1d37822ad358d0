# TransCNN-Large with the authors' ImageNet checkpoint (GitHub release v1.0, 256x256):
# transcnn_s.py with the large arch, its checkpoint, drop path and channels.
_base_ = './transcnn_s.py'
backbone = dict(
    arch='large',
    drop_path_rate=0.3,  # 0.3: 80.0 M parameters, 26 blocks (see transcnn_s.py)
    init_cfg=dict(checkpoint='https://github.com/yun-liu/HAT-Net/releases/download/v1.0/TransCNN-Large.pth'))
backbone_channels = [64, 128, 384, 768]
