# Shunted-B with the authors' ImageNet checkpoint, published only on Google Drive / Baidu Pan:
# download it to checkpoints/shunted_b.pth (docs/model_zoo.md, "Checkpoints"). shunted_s.py with the base
# arch, its checkpoint and drop path (the channels are those of S).
_base_ = './shunted_s.py'
backbone = dict(
    arch='base',
    drop_path_rate=0.2,  # 0.2: 39.6 M parameters, 33 blocks (see shunted_s.py)
    init_cfg=dict(checkpoint='checkpoints/shunted_b.pth'))
