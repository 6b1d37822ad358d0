"""The user-facing tools: checkpoint conversion and picture demo."""
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reference as R

ROOT = Path(__file__).parents[1]


def tool(name):
    return runpy.run_path(str(ROOT / 'tools' / f'{name}.py'))


def test_convert_checkpoint_reports_and_verifies(tmp_path, capsys):
    src = R.write_official_checkpoint('hatnet-tiny', tmp_path / 'official.pth')
    dst = tmp_path / 'hatnet_t.pth'
    assert tool('convert_checkpoint')['main'](['mmhat.HATNet', '--arch', 'tiny', str(src),
                                               str(dst)]) == 0
    out = capsys.readouterr().out
    assert 'verified by a strict load' in out
    assert 'dropped 2 (classification head)' in out and 'dropped 26 (never used' in out
    saved = torch.load(dst)
    assert saved['meta']['arch'] == 'tiny' and 'stages.0.blocks.0.attn.qkv.weight' in saved[
        'state_dict']
    # the converted file loads into the backbone as init_cfg
    from mmhat.registry import MODELS
    model = MODELS.build(dict(type='mmhat.HATNet', arch='tiny',
                              init_cfg=dict(type='Pretrained', checkpoint=str(dst))))
    model.init_weights()


def test_convert_checkpoint_wrong_arch_is_a_clear_error(tmp_path, capsys):
    src = R.write_official_checkpoint('hatnet-tiny', tmp_path / 'official.pth')
    rc = tool('convert_checkpoint')['main'](['mmhat.HATNet', '--arch', 'small', str(src),
                                             str(tmp_path / 'x.pth')])
    err = capsys.readouterr().err
    assert rc == 2 and "arch='small'" in err and 'shape mismatches' in err
    assert not (tmp_path / 'x.pth').exists()


def _model_checkpoint(config: str, path: Path, classes) -> Path:
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    cfg = Config.fromfile(str(ROOT / config))
    scope = cfg.default_scope
    cfg.model.backbone.init_cfg = None
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(cfg.model)
    torch.save({'state_dict': model.state_dict(), 'meta': {'dataset_meta': {
        'classes': classes,
        'palette': [(i % 256, i * 7 % 256, i * 13 % 256) for i in range(len(classes))]}}},
               path)
    return path


@pytest.mark.parametrize('config,classes', [
    ('configs/det/maskrcnn_hatnet_t_toy.py', ('circle', 'square', 'triangle')),
    ('configs/seg/fpn_hatnet_t_ade20k.py', tuple(f'class{i}' for i in range(150))),
])
def test_demo_draws_a_picture_per_image(tmp_path, config, classes, capsys):
    ckpt = _model_checkpoint(config, tmp_path / 'model.pth', classes)
    images = tmp_path / 'images'
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ('a', 'b'):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(images / f'{name}.jpg')
    (images / 'notes.txt').write_text('not an image')
    out = tmp_path / 'out'
    assert tool('demo')['main']([str(ROOT / config), str(ckpt), str(images), '--out-dir',
                                 str(out), '--device', 'cpu']) == 0
    assert sorted(p.name for p in out.iterdir()) == ['a.png', 'b.png']
    assert Image.open(out / 'a.png').size[0] >= 128


def test_demo_missing_input_is_a_clear_error(tmp_path, capsys):
    rc = tool('demo')['main']([str(ROOT / 'configs/det/maskrcnn_hatnet_t_toy.py'), 'x.pth',
                               str(tmp_path / 'nothing')])
    assert rc == 2 and 'input not found' in capsys.readouterr().err
