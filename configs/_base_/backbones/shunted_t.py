# Shunted-T with the authors' ImageNet checkpoint, published only on Google Drive / Baidu Pan:
# download it to checkpoints/shunted_t.pth (docs/model_zoo.md, "Checkpoints"). shunted_s.py with the tiny
# arch, its checkpoint and drop path (the channels are those of S).
_base_ = './shunted_s.py'
backbone = dict(
    arch='tiny',
    drop_path_rate=0.1,  # 0.1 as S (11.5 M parameters, 8 blocks)
    init_cfg=dict(checkpoint='checkpoints/shunted_t.pth'))
