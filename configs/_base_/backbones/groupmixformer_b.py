# GroupMixFormer-B with the authors' ImageNet checkpoint, published only on OneDrive:
# download it to checkpoints/groupmixformer_b.pth (docs/model_zoo.md, "Checkpoints"). groupmixformer_s.py
# with the base arch, its checkpoint, drop path and channels.
_base_ = './groupmixformer_s.py'
backbone = dict(
    arch='base',
    drop_path_rate=0.2,  # 0.2: 45.8 M parameters, 36 blocks (see groupmixformer_s.py)
    init_cfg=dict(checkpoint='checkpoints/groupmixformer_b.pth'))
backbone_channels = [200, 240, 320, 480]
