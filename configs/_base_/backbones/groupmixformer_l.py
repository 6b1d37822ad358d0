# GroupMixFormer-L with the authors' ImageNet checkpoint, published only on OneDrive:
# download it to checkpoints/groupmixformer_l.pth (docs/model_zoo.md, "Checkpoints"). groupmixformer_s.py
# with the large arch, its checkpoint, drop path and channels.
# The authors' README links the same OneDrive folder for M and L: check that the file you
# download is the large one (another variant's checkpoint fails to load, naming the keys).
_base_ = './groupmixformer_s.py'
backbone = dict(
    arch='large',
    drop_path_rate=0.3,  # 0.3: 71.8 M parameters, 58 blocks (see groupmixformer_s.py)
    init_cfg=dict(checkpoint='checkpoints/groupmixformer_l.pth'))
backbone_channels = [240, 320, 360, 480]
