"""Every config of the repo loads and builds; necks fit their backbones; tools give clear
errors when data is missing."""
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.registry import DefaultScope, init_default_scope

import mmhat  # noqa: F401
from mmhat.registry import MODELS as MMHAT_MODELS

ROOT = Path(__file__).parents[1]
CONFIGS = sorted(p for p in (ROOT / 'configs').rglob('*.py') if '_base_' not in p.parts)


def build_model(cfg):
    scope = cfg.get('default_scope', 'mmdet')
    init_default_scope(scope)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(cfg.model)


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {'maskrcnn_hatnet_s_coco.py', 'retinanet_hatnet_s_coco.py',
            'fpn_hatnet_s_ade20k.py'} <= names


@pytest.mark.parametrize('path', CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_and_neck_fits_backbone(path):
    cfg = Config.fromfile(str(path))
    model = build_model(cfg)
    backbone = model.backbone
    assert type(backbone).__module__.startswith('mmhat.'), type(backbone)
    assert list(cfg.model.neck.in_channels) == list(backbone.out_channels)
    # the config's init_cfg is kept for init_weights (not loaded at build)
    assert cfg.model.backbone.get('init_cfg') == backbone.init_cfg


@pytest.mark.parametrize('name', ['maskrcnn_hatnet_s_coco', 'retinanet_hatnet_s_coco'])
def test_recipe_of_detection_configs(name):
    cfg = Config.fromfile(str(ROOT / 'configs' / 'det' / f'{name}.py'))
    lr = 2e-4 if name.startswith('maskrcnn') else 1e-4
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=lr, weight_decay=1e-4)
    warmup, steps = cfg.param_scheduler
    assert warmup.type == 'LinearLR' and warmup.end == 500 and not warmup.by_epoch
    assert steps.milestones == [8, 11] and cfg.train_cfg.max_epochs == 12
    assert cfg.train_dataloader.batch_size * 8 == 16
    assert cfg.model.backbone.drop_path_rate == 0.1
    assert cfg.model.backbone.init_cfg.checkpoint.endswith('/v2.0/HAT-Net_Small.pth')


def test_recipe_of_segmentation_config():
    cfg = Config.fromfile(str(ROOT / 'configs' / 'seg' / 'fpn_hatnet_s_ade20k.py'))
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=1e-4, weight_decay=1e-4)
    (poly, ) = cfg.param_scheduler
    assert poly.type == 'PolyLR' and poly.power == 0.9 and poly.end == 80000
    assert cfg.train_cfg.max_iters == 80000 and cfg.train_dataloader.batch_size * 4 == 16
    assert cfg.crop_size == (512, 512) and cfg.model.pretrained is None


def test_registry_builds_from_mmdet_and_mmseg_scopes():
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG
    for registry in (DET, SEG):
        with DefaultScope.overwrite_default_scope(registry.scope):
            model = registry.build(dict(type='mmhat.HATNet', arch='tiny'))
        assert type(model) is MMHAT_MODELS.get('HATNet')


@pytest.mark.parametrize('config,kind', [('det/maskrcnn_hatnet_s_coco.py', 'COCO 2017'),
                                         ('seg/fpn_hatnet_s_ade20k.py', 'ADE20K')])
def test_train_without_data_is_one_clear_message(tmp_path, capsys, config, kind):
    import runpy
    train = runpy.run_path(str(ROOT / 'tools' / 'train.py'))
    rc = train['main']([str(ROOT / 'configs' / config), '--work-dir', str(tmp_path / 'wd'),
                        '--data-root', str(tmp_path / 'nothing')])
    err = capsys.readouterr().err
    assert rc == 2
    assert f'{kind}' in err and str(tmp_path / 'nothing') in err and 'Traceback' not in err


def test_train_with_missing_local_checkpoint_says_where_to_get_it(tmp_path, capsys):
    import runpy
    train = runpy.run_path(str(ROOT / 'tools' / 'train.py'))
    data = tmp_path / 'coco'
    for sub in ('annotations', 'train2017', 'val2017'):
        (data / sub).mkdir(parents=True)
    for ann in ('instances_train2017.json', 'instances_val2017.json'):
        (data / 'annotations' / ann).write_text('{}')
    rc = train['main']([str(ROOT / 'configs/det/maskrcnn_shunted_s_coco.py'),
                        '--work-dir', str(tmp_path / 'wd'), '--data-root', str(data)])
    err = capsys.readouterr().err
    assert rc == 2
    assert 'checkpoints/shunted_s.pth' in err and 'Model zoo' in err and 'Traceback' not in err


SWAP = {
    'mmdet': """_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(_delete_=True, type='mmhat.HATNet', arch='small', drop_path_rate=0.1,
                  init_cfg=dict(type='Pretrained', checkpoint='https://github.com/yun-liu/HAT-Net/releases/download/v2.0/HAT-Net_Small.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))
""",
    'mmseg': """_base_ = 'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py'
model = dict(
    pretrained=None,
    backbone=dict(_delete_=True, type='mmhat.HATNet', arch='small', drop_path_rate=0.1),
    neck=dict(in_channels=[64, 128, 320, 512]))
""",
}


@pytest.mark.parametrize('scope', SWAP)
def test_readme_swap_into_an_existing_mm_config(tmp_path, scope):
    """The README's lines turn mmdet's/mmseg's own R50 configs into HAT-Net ones."""
    readme = (ROOT / 'README.md').read_text()
    first_line = SWAP[scope].splitlines()[0]
    assert first_line.split('::')[1].rstrip("'") in readme
    path = tmp_path / f'{scope}_swap.py'
    path.write_text(SWAP[scope])
    cfg = Config.fromfile(str(path))
    model = build_model(cfg)
    assert type(model.backbone).__name__ == 'HATNet'
    assert list(cfg.model.neck.in_channels) == model.backbone.out_channels
