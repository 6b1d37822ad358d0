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


def test_test_py_routes_official_checkpoints_to_init_cfg_and_refuses_them_for_detectors(
        tmp_path):
    """tools/test.py: a trained model's checkpoint is load_from; an official ImageNet file
    with a classification config is read by the backbone and the head through init_cfg
    (load_from would match none of its keys and evaluate random weights silently); with a
    detector config it is refused, saying what tools/test.py needs."""
    from mmengine.config import Config

    from mmhat.checkpoint import CheckpointError
    from mmhat.engine import route_test_checkpoint
    official = R.write_official_checkpoint('hatnet-tiny', tmp_path / 'official.pth')
    cls_cfg = Config.fromfile(str(ROOT / 'configs/cls/hatnet_t_in1k.py'))
    assert route_test_checkpoint(cls_cfg, str(official)) == 'init_cfg'
    assert cls_cfg.load_from is None
    for part in (cls_cfg.model.backbone, cls_cfg.model.head):
        assert part.init_cfg == dict(type='Pretrained', checkpoint=str(official))
    det_cfg = Config.fromfile(str(ROOT / 'configs/det/maskrcnn_hatnet_t_toy.py'))
    with pytest.raises(CheckpointError, match=r'not a checkpoint of a whole trained model .*'
                                              r'give it the checkpoint tools/train.py wrote'):
        route_test_checkpoint(det_cfg, str(official))
    trained = tmp_path / 'epoch_1.pth'
    torch.save({'meta': {}, 'state_dict': {'backbone.stem.conv1.weight': torch.zeros(1)}},
               trained)
    assert route_test_checkpoint(det_cfg, str(trained)) == 'load_from'
    assert det_cfg.load_from == str(trained)
