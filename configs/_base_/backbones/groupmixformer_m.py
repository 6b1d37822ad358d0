# GroupMixFormer-M with the authors' ImageNet checkpoint, published only on OneDrive:
# download it to checkpoints/groupmixformer_m.pth (docs/model_zoo.md, "Checkpoints"). groupmixformer_s.py
# with the mini arch, its checkpoint, drop path and channels.
# The authors' README links the same OneDrive folder for M and L: check that the file you
# download is the mini one (another variant's checkpoint fails to load, naming the keys).
_base_ = './groupmixformer_s.py'
backbone = dict(
    arch='mini',
    drop_path_rate=0.1,  # 0.1 as S (5.7 M parameters, 22 blocks)
    init_cfg=dict(checkpoint='checkpoints/groupmixformer_m.pth'))
backbone_channels = [40, 80, 160, 160]
