# GroupMixFormer-T with the authors' ImageNet checkpoint, published only on OneDrive:
# download it to checkpoints/groupmixformer_t.pth (docs/model_zoo.md, "Checkpoints"). groupmixformer_s.py
# with the tiny arch, its checkpoint, drop path and channels.
_base_ = './groupmixformer_s.py'
backbone = dict(
    arch='tiny',
    drop_path_rate=0.1,  # 0.1 as S (11.0 M parameters, 24 blocks)
    init_cfg=dict(checkpoint='checkpoints/groupmixformer_t.pth'))
backbone_channels = [80, 160, 200, 240]
