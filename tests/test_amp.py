"""Mixed precision trains every family: ``tools/train.py --amp`` (bfloat16 autocast on the CPU,
``mmhat.BF16AutocastOptimWrapper``) runs the toy Mask R-CNN with each family's small variant
as the backbone, and every logged loss stays finite.

The configs are built from the toy Mask R-CNN config and the family's backbone base
(``configs/_base_/backbones/``) with ``init_cfg=None`` (nothing to download), BN instead of
SyncBN (CPU), and the neck's ``in_channels`` taken from the built backbone's ``out_channels``.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mmengine.config import Config

import backbone_contract as contract
from mmhat.registry import MODELS

ROOT = Path(__file__).parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE')
#: each family's smallest variant, by its backbone base config `<name>_<letter>.py`
FAMILIES = [f'{cls.reference_name}_{cls.smallest_arch[0]}' for cls in contract.families()]
NUM_ITERS = 4  # 8 images, batch 2, one epoch


@pytest.fixture(scope='module')
def toy_coco(tmp_path_factory):
    data = tmp_path_factory.mktemp('amp') / 'toy_coco'
    subprocess.run([sys.executable, str(ROOT / 'tools' / 'make_toy_coco.py'), '--out',
                    str(data), '--num-train', '8', '--num-val', '2'], check=True, env=ENV)
    return str(data)


def toy_config_with(family: str) -> Config:
    """The toy Mask R-CNN with ``configs/_base_/backbones/<family>.py`` as its backbone."""
    cfg = Config.fromfile(str(ROOT / 'configs' / 'det' / 'maskrcnn_hatnet_t_toy.py'))
    backbone = Config.fromfile(
        str(ROOT / 'configs' / '_base_' / 'backbones' / f'{family}.py')).backbone.to_dict()
    backbone.pop('_delete_', None)
    backbone['init_cfg'] = None
    if 'norm_cfg' in backbone:
        backbone['norm_cfg'] = dict(type='BN')  # SyncBN cannot run on CPU
    cfg.model.backbone = backbone
    cfg.model.neck.in_channels = list(MODELS.build(backbone).out_channels)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize('family', FAMILIES)
def test_amp_trains_every_family_with_finite_losses(tmp_path, toy_coco, family):
    config = tmp_path / f'maskrcnn_{family}_toy.py'
    toy_config_with(family).dump(str(config))
    work_dir = tmp_path / 'wd'
    cmd = [sys.executable, str(ROOT / 'tools' / 'train.py'), str(config), '--amp',
           '--data-root', toy_coco, '--work-dir', str(work_dir), '--cfg-options',
           'train_cfg.max_epochs=1', 'train_dataloader.batch_size=2',
           'default_hooks.logger.interval=1', 'log_processor.window_size=1',
           'val_dataloader=None', 'val_cfg=None', 'val_evaluator=None']
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # the run used the CPU autocast wrapper (the runner dumps the config it ran)
    assert 'BF16AutocastOptimWrapper' in (work_dir / config.name).read_text()
    rows = [json.loads(line) for line in
            next(work_dir.glob('*/vis_data/scalars.json')).read_text().splitlines()]
    rows = [row for row in rows if 'loss' in row]
    assert len(rows) == NUM_ITERS, rows
    for row in rows:
        losses = {k: v for k, v in row.items() if 'loss' in k}
        assert len(losses) >= 6, row  # loss, RPN cls/bbox, RoI cls/bbox, mask
        assert all(math.isfinite(v) for v in losses.values()), f'{family}: {row}'
