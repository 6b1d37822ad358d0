"""The swap-in mistakes a new user makes with mmdet's and mmseg's own R50 configs, met the way
the Runner meets them (config resolved by mmengine, model built by the scope's registry,
``init_weights()``), with the network unavailable: each error names the cause and the fix.

Nothing leaves the machine: every test runs with socket connections and name lookups
refused, and torch hub's cache in a temporary folder.
"""
import errno
import runpy
import socket
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope, init_default_scope

from mmhat.checkpoint import CheckpointError
from mmhat.engine import check_checkpoints

ROOT = Path(__file__).parents[1]
MMDET_BASE = "_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'\n"
MMSEG_BASE = "_base_ = 'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py'\n"
NECK = 'neck=dict(in_channels=[64, 128, 320, 512])'
OFFICIAL_URL = 'https://github.com/yun-liu/HAT-Net/releases/download/v2.0/HAT-Net_Tiny.pth'


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Refuse every connection and DNS lookup (recorded), and cache downloads in tmp_path."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(errno.ENETUNREACH, 'Network is unreachable')

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    monkeypatch.setattr(socket, 'getaddrinfo', refuse)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    assert torch.hub.get_dir().startswith(str(tmp_path))
    return attempts


def config(tmp_path, text: str) -> Config:
    path = tmp_path / 'swap.py'
    path.write_text(text)
    return Config.fromfile(str(path))


def build(cfg: Config):
    """What the Runner does: build ``cfg.model`` with the registry of the config's scope."""
    scope = cfg.get('default_scope')
    init_default_scope(scope)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(cfg.model)


def init_error(cfg: Config) -> str:
    model = build(cfg)
    with pytest.raises(CheckpointError) as info:
        model.init_weights()
    return str(info.value)


def test_mmseg_base_pretrained_left_in(tmp_path, offline):
    """mmseg's base injects pretrained='open-mmlab://resnet50_v1c' into the swapped backbone."""
    cfg = config(tmp_path, MMSEG_BASE + f"model = dict(backbone=dict(_delete_=True, "
                 f"type='mmhat.HATNet', arch='tiny'), {NECK})\n")
    message = init_error(cfg)
    assert message.startswith("mmhat.HATNet cannot load 'open-mmlab://resnet50_v1c'")
    for part in ('nothing was downloaded', 'model.pretrained=None', 'docs/model_zoo.md'):
        assert part in message
    with pytest.raises(CheckpointError, match=r'It is set by model\.pretrained: .*'
                       r'set model\.pretrained=None\. For ImageNet weights'):
        check_checkpoints(cfg)
    assert offline == []


def test_mmdet_swap_without_delete(tmp_path, offline):
    """ResNet's depth/num_stages/style/init_cfg merge into the mmhat backbone."""
    cfg = config(tmp_path, MMDET_BASE + f"model = dict(backbone=dict(type='mmhat.HATNet', "
                 f"arch='tiny'), {NECK})\n")
    with pytest.raises(TypeError, match=r"got the arguments \['depth', 'num_stages', 'style'\] "
                       r"of another backbone.*merged.*Add _delete_=True"):
        build(cfg)
    # tools/train.py checks the config before the Runner builds anything
    with pytest.raises(CheckpointError, match=r"cannot load 'torchvision://resnet50'.*It is set "
                       r"by model\.backbone\.init_cfg: .*add _delete_=True"):
        check_checkpoints(cfg)
    assert offline == []


def test_explicit_torchvision_init_cfg(tmp_path, offline):
    cfg = config(tmp_path, MMDET_BASE + "model = dict(backbone=dict(_delete_=True, "
                 "type='mmhat.HATNet', arch='tiny', init_cfg=dict(type='Pretrained', "
                 f"checkpoint='torchvision://resnet50')), {NECK})\n")
    message = init_error(cfg)
    assert message.startswith("mmhat.HATNet cannot load 'torchvision://resnet50': "
                              "torchvision:// names a torchvision ImageNet model")
    assert 'add _delete_=True' in message and 'official HATNet checkpoint' in message
    assert offline == []


@pytest.mark.parametrize('checkpoint', ['openmmlab://resnet50_v1c', 'modelzoo://resnet50',
                                        'mmcls://resnet50', 'timm://resnet50'])
def test_the_other_zoos_are_refused_before_any_download(offline, checkpoint):
    from mmhat.models.backbones import HATNet
    model = HATNet('tiny', init_cfg=dict(type='Pretrained', checkpoint=checkpoint))
    with pytest.raises(CheckpointError) as info:
        model.init_weights()
    message = str(info.value)
    assert message.startswith(f"mmhat.HATNet cannot load '{checkpoint}': "
                              f"{checkpoint.split('//')[0]}// names ")
    for part in ('nothing was downloaded', 'model.pretrained=None', '_delete_=True',
                 'docs/model_zoo.md'):
        assert part in message
    assert offline == []


def test_official_url_that_cannot_be_downloaded(tmp_path, offline):
    cfg = config(tmp_path, MMDET_BASE + f"model = dict(backbone=dict(_delete_=True, "
                 f"type='mmhat.HATNet', arch='tiny', init_cfg=dict(type='Pretrained', "
                 f"checkpoint='{OFFICIAL_URL}')), {NECK})\n")
    check_checkpoints(cfg)  # an mmhat URL: nothing to object to before the download
    message = init_error(cfg)
    cached = Path(torch.hub.get_dir()) / 'checkpoints' / 'HAT-Net_Tiny.pth'
    assert message.startswith(f"could not download checkpoint '{OFFICIAL_URL}' (URLError: "
                              f"<urlopen error [Errno {errno.ENETUNREACH}] Network is "
                              f"unreachable>). This is a download failure")
    assert f'put it at {cached} ' in message and "checkpoint=...) at that local path" in message
    assert 'corrupt' not in message
    assert offline and not cached.exists() and not list(cached.parent.iterdir())


@pytest.fixture(scope='module')
def resnet50_file(tmp_path_factory):
    from mmdet.models.backbones import ResNet
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('resnet') / 'resnet50.pth'
    torch.save(ResNet(depth=50).state_dict(), path)
    return path


def test_local_resnet50_state_dict(tmp_path, offline, resnet50_file):
    cfg = config(tmp_path, MMSEG_BASE + f"model = dict(pretrained=None, backbone=dict("
                 f"_delete_=True, type='mmhat.HATNet', arch='tiny', init_cfg=dict("
                 f"type='Pretrained', checkpoint='{resnet50_file}')), {NECK})\n")
    message = init_error(cfg)
    first, *rest = message.splitlines()
    assert first == (f"checkpoint '{resnet50_file}' does not fit HATNet: its keys look like a "
                     f"ResNet (keys conv1/stem, layer1-4), not an mmhat or official HATNet "
                     f"checkpoint.")
    assert rest[-1].startswith('  Fix: If a base config put it there: ')
    assert 'model.pretrained=None' in rest[-1] and 'official HATNet checkpoint' in rest[-1]
    assert any('unexpected keys: conv1.weight, bn1.weight' in line for line in rest)
    assert offline == []


def ade20k(tmp_path) -> Path:
    """An ADE20K folder with one (never read) sample per split: the Runner lists the files
    before it initialises the weights."""
    root = tmp_path / 'ade'
    for kind, suffix in (('images', '.jpg'), ('annotations', '.png')):
        for split in ('training', 'validation'):
            (root / kind / split).mkdir(parents=True)
            (root / kind / split / f'0{suffix}').write_bytes(b'')
    return root


@pytest.mark.parametrize('case', ['base_pretrained', 'resnet50_file'])
def test_train_py_says_one_error_line(tmp_path, capsys, offline, case, resnet50_file):
    """Caught before the Runner (the config check) or at init_weights inside the Runner."""
    fix = ('' if case == 'base_pretrained' else f"pretrained=None, backbone=dict(_delete_=True, "
           f"type='mmhat.HATNet', arch='tiny', init_cfg=dict(type='Pretrained', "
           f"checkpoint='{resnet50_file}')), ")
    backbone = '' if fix else "backbone=dict(_delete_=True, type='mmhat.HATNet', arch='tiny'), "
    path = tmp_path / 'swap.py'
    path.write_text(MMSEG_BASE + f'model = dict({fix}{backbone}{NECK})\n')
    train = runpy.run_path(str(ROOT / 'tools' / 'train.py'))
    rc = train['main']([str(path), '--work-dir', str(tmp_path / 'wd'), '--data-root',
                        str(ade20k(tmp_path))])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert rc == 2 and len(errors) == 1 and 'Traceback' not in err
    expected = ("error: mmhat.HATNet cannot load 'open-mmlab://resnet50_v1c'"
                if case == 'base_pretrained' else f"error: checkpoint '{resnet50_file}' does "
                f"not fit HATNet: its keys look like a ResNet")
    assert errors[0].startswith(expected)
    assert 'model.pretrained=None' in err.split('error:')[1] and offline == []
