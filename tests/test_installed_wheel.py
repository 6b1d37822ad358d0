"""An installed mmhat works outside the repository.

One wheel is built (``pip wheel --no-deps --no-build-isolation``) from a copy of the working
tree, so the checkout gets no ``build/`` folder and nothing stale from an earlier build can
leak in, and installed with ``pip install --no-deps --no-index --target SITE``. Every check
then runs in a subprocess whose working directory is a temporary folder (not the checkout)
and whose ``PYTHONPATH`` is ``SITE`` only: the venv's editable mmhat would be found after
``SITE`` (its finder comes after the path finder), and the first test proves it is not.

The slow tests train with mmdet's and mmseg's *own* ``tools/train.py`` from their wheels
(``<package>/.mim/tools/train.py``), on a user config that starts from their own configs
and names mmhat's backbone, optimizer wrapper and hooks by scope (``mmhat.X``): no
``custom_imports``, nothing from the checkout but the toy data generators. Each trains a
shortened schedule (``--cfg-options``), stops, and continues with ``--resume`` to the
config's end, which on torch >= 2.6 needs ``mmhat.ResumeCompatHook`` (without it the resume
fails with "Weights only load failed"). The Mask R-CNN trains under
``mmhat.BF16AutocastOptimWrapper`` with narrow heads and one iteration per epoch; the FPN
keeps mmseg's float32 SGD: bf16 autocast on a CPU without native bf16 measured 9-16 times
slower than float32 here, too slow for two runs of it.

Whole file: 66-73 s on 2 shared cores (mmdet 33 s, mmseg 20 s).
"""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.util import find_spec
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds per subprocess; generous, the machine is shared
#: folders of the working tree a build does not need (tests/ holds large reference data)
NOT_FOR_THE_BUILD = ('tests/', 'docs/')


def _working_tree_files() -> List[str]:
    """Tracked and untracked-but-not-ignored files of the checkout, as a build sees them."""
    out = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [f for f in out.splitlines()
            if not f.startswith(NOT_FOR_THE_BUILD) and (ROOT / f).is_file()]


def _copy_source(dest: Path) -> Path:
    for name in _working_tree_files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


def _build_wheel(source: Path, out: Path) -> Path:
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', str(source), '--no-deps',
                    '--no-build-isolation', '-q', '-w', str(out)],
                   check=True, timeout=TIMEOUT)
    (wheel,) = out.glob('mmhat-*.whl')
    return wheel


def _shipped(wheel: Path) -> List[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    """The wheel, built once for the module from a copy of the working tree."""
    base = tmp_path_factory.mktemp('wheel')
    source = _copy_source(base / 'src')
    built = _build_wheel(source, base / 'dist')
    # the configs went into the build directory, not into the (copied) source tree
    assert not (source / 'mmhat' / '.mim').exists()
    return built


@pytest.fixture(scope='module')
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a folder of its own."""
    target = tmp_path_factory.mktemp('site')
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index', '-q',
                    '--target', str(target), str(wheel)], check=True, timeout=TIMEOUT)
    return target


@pytest.fixture(scope='module')
def elsewhere(tmp_path_factory) -> Path:
    """The working directory of every subprocess: not the checkout."""
    return tmp_path_factory.mktemp('user')


@pytest.fixture(scope='module')
def env(site) -> Dict[str, str]:
    """Subprocess environment: the installed mmhat on ``PYTHONPATH``, nothing else of ours."""
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONNOUSERSITE='1',
               OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE',
               PYTHONWARNINGS='ignore:pkg_resources is deprecated:UserWarning')
    env.pop('PYTHONSTARTUP', None)
    return env


def run(args: List[str], cwd: Path, env: Dict[str, str],
        check: bool = True) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``cwd``; on an unexpected status, fail with its output."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    if check and proc.returncode != 0:
        pytest.fail(f'python {" ".join(args)} exited {proc.returncode}\n'
                    f'--- stdout (tail)\n{proc.stdout[-4000:]}\n'
                    f'--- stderr (tail)\n{proc.stderr[-8000:]}')
    return proc


def configs(*args: str, cwd: Path, env: Dict[str, str],
            check: bool = True) -> subprocess.CompletedProcess:
    return run(['-m', 'mmhat.configs', *args], cwd, env, check)


# --- the wheel itself ---------------------------------------------------------------------

def test_wheel_ships_every_config_under_mim(wheel):
    shipped = _shipped(wheel)
    expected = sorted(p.relative_to(ROOT / 'configs').as_posix()
                      for p in (ROOT / 'configs').rglob('*.py'))
    in_wheel = sorted(n[len('mmhat/.mim/configs/'):] for n in shipped
                      if n.startswith('mmhat/.mim/configs/'))
    assert in_wheel == expected
    assert 'mmhat/configs.py' in shipped
    assert not [n for n in shipped if n.startswith(('configs/', 'tests/', 'tools/'))]


def test_wheel_drops_a_module_deleted_since_the_last_build(tmp_path):
    """setuptools never empties ``build/lib``; setup.py does, so a module removed from the
    source is not shipped by the next ``pip wheel .`` in the same tree."""
    source = _copy_source(tmp_path / 'src')
    stale = source / 'mmhat' / 'gone_module.py'
    stale.write_text('# deleted before the second build\n')
    assert 'mmhat/gone_module.py' in _shipped(_build_wheel(source, tmp_path / 'first'))
    stale.unlink()
    assert 'mmhat/gone_module.py' not in _shipped(_build_wheel(source, tmp_path / 'second'))


def test_source_distribution_carries_the_configs(tmp_path):
    """MANIFEST.in: a wheel built from the sdist ships the configs as well."""
    source = _copy_source(tmp_path / 'src')
    subprocess.run([sys.executable, 'setup.py', '-q', 'sdist', '-d', str(tmp_path / 'sdist')],
                   cwd=source, check=True, capture_output=True, timeout=TIMEOUT)
    (sdist,) = (tmp_path / 'sdist').glob('mmhat-*.tar.gz')
    wheel = _build_wheel(sdist, tmp_path / 'dist')
    assert 'mmhat/.mim/configs/det/maskrcnn_hatnet_t_coco.py' in _shipped(wheel)


def test_checkout_uses_its_own_configs_folder():
    """The editable install (and a checkout on PYTHONPATH) reads ``<checkout>/configs``."""
    from mmhat import configs
    if Path(configs.__file__).resolve().parents[1] != ROOT:
        pytest.skip('mmhat is not imported from this checkout')
    assert configs.config_root() == ROOT / 'configs'
    assert configs.config_path('maskrcnn_hatnet_t_toy') == \
        ROOT / 'configs' / 'det' / 'maskrcnn_hatnet_t_toy.py'


# --- the installed package, used from elsewhere -------------------------------------------

def test_installed_mmhat_is_the_one_imported(site, elsewhere, env):
    """(a) ``mmhat``, its configs and the backbone a config names all come from SITE."""
    probe = ('import inspect, mmhat, mmhat.configs\n'
             'from mmhat.registry import MODELS\n'
             'print(mmhat.__file__)\n'
             'print(mmhat.configs.config_root())\n'
             "print(inspect.getfile(MODELS.get('HATNet')))\n")
    lines = run(['-c', probe], elsewhere, env).stdout.split()
    assert len(lines) == 3
    for line in lines:
        assert Path(line).resolve().is_relative_to(site.resolve()), line
        assert not Path(line).resolve().is_relative_to(ROOT), line
    assert lines[1] == str(site / 'mmhat' / '.mim' / 'configs')


def test_configs_command_lists_prints_and_copies(site, elsewhere, env):
    """(b) ``python -m mmhat.configs`` from the installed package, and what it prints loads
    with mmengine: the path itself, a copy outside the package, a one-line child config."""
    names = configs('list', cwd=elsewhere, env=env).stdout.split()
    assert 'det/maskrcnn_hatnet_t_coco.py' in names and 'seg/fpn_hatnet_t_ade20k.py' in names
    assert not [n for n in names if n.startswith('_base_/')]
    assert '_base_/backbones/hatnet_t.py' in configs('list', '--all', cwd=elsewhere,
                                                     env=env).stdout.split()
    assert configs('list', 'upernet_*', cwd=elsewhere, env=env).stdout.split() == [
        'seg/upernet_groupmixformer_s_ade20k.py', 'seg/upernet_hatnet_s_ade20k.py',
        'seg/upernet_shunted_s_ade20k.py', 'seg/upernet_transcnn_s_ade20k.py']

    expected = site / 'mmhat' / '.mim' / 'configs' / 'det' / 'maskrcnn_hatnet_t_coco.py'
    for name in ('det/maskrcnn_hatnet_t_coco.py', 'det/maskrcnn_hatnet_t_coco',
                 'maskrcnn_hatnet_t_coco.py', 'maskrcnn_hatnet_t_coco'):
        assert configs('path', name, cwd=elsewhere, env=env).stdout.strip() == str(expected)
    seg = configs('path', 'fpn_hatnet_t_ade20k', cwd=elsewhere, env=env).stdout.strip()
    backbone_base = configs('path', '_base_/backbones/hatnet_t.py', cwd=elsewhere,
                            env=env).stdout.strip()

    # the recipes of docs/installed_package.md: a copy, a one-line child, mmdet's own config
    # with mmhat's backbone base
    copied = configs('copy', 'det/maskrcnn_hatnet_t_coco.py', 'my_configs/', cwd=elsewhere,
                     env=env).stdout.strip()
    assert copied == str(elsewhere / 'my_configs' / 'maskrcnn_hatnet_t_coco.py')
    child = elsewhere / 'my_maskrcnn.py'
    child.write_text(f"_base_ = '{expected}'\n")
    recipe = elsewhere / 'my_maskrcnn_hatnet_t.py'
    recipe.write_text(
        "_base_ = [\n"
        "    'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',\n"
        f"    '{backbone_base}',\n"
        "]\n"
        "model = dict(backbone={{_base_.backbone}}, "
        "neck=dict(in_channels={{_base_.backbone_channels}}))\n"
        "custom_hooks = [dict(type='mmhat.ResumeCompatHook')]\n")

    loads = ('import sys\n'
             'from mmengine.config import Config\n'
             'for path in sys.argv[1:]:\n'
             '    model = Config.fromfile(path).model\n'
             '    print(model.backbone.type, model.backbone.arch, model.neck.in_channels,\n'
             '          sorted(model.backbone))\n')
    out = run(['-c', loads, str(expected), seg, copied, str(child), str(recipe)], elsewhere,
              env).stdout
    keys = "['arch', 'drop_path_rate', 'init_cfg', 'type']"  # nothing left of the ResNet
    assert out.splitlines() == [f'mmhat.HATNet tiny [48, 96, 240, 384] {keys}'] * 5


def test_ambiguous_names_are_refused(tmp_path, monkeypatch):
    from mmhat import configs
    for group in configs.CONFIG_GROUPS:
        (tmp_path / group).mkdir()
        (tmp_path / group / 'same.py').write_text('x = 1\n')
    monkeypatch.setattr(configs, 'config_root', lambda: tmp_path)
    with pytest.raises(configs.ConfigNotFoundError, match='ambiguous.*det/same.py, seg/same.py'):
        configs.resolve_name('same')
    assert configs.resolve_name('seg/same') == 'seg/same.py'


@pytest.mark.parametrize('args, message', [
    (['path', 'maskrcnn_hatnet_tt_coco'], "close matches: det/maskrcnn_hatnet_t_coco.py"),
    (['path', 'no_such_thing'], 'python -m mmhat.configs list'),
    (['copy', 'det/nothing.py'], "no mmhat config 'det/nothing.py'"),
])
def test_configs_command_rejects_bad_names_without_a_traceback(args, message, elsewhere, env):
    proc = configs(*args, cwd=elsewhere, env=env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert 'Traceback' not in proc.stderr and proc.stdout == ''


def test_configs_command_does_not_overwrite_without_force(site, elsewhere, env):
    dest = elsewhere / 'exists.py'
    dest.write_text('# mine\n')
    proc = configs('copy', 'seg/fpn_hatnet_t_toy.py', str(dest), cwd=elsewhere, env=env,
                   check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert '--force' in proc.stderr and dest.read_text() == '# mine\n'
    configs('copy', 'seg/fpn_hatnet_t_toy.py', str(dest), '--force', cwd=elsewhere, env=env)
    base = site / 'mmhat' / '.mim' / 'configs' / 'seg' / 'fpn_hatnet_t_ade20k.py'
    assert f"_base_ = [\n    {str(base)!r},\n]" in dest.read_text()


# --- mmdet's and mmseg's own train.py -----------------------------------------------------

def own_train_script(package: str) -> str:
    """``<package>/.mim/tools/train.py`` of the installed mmdet / mmseg (not imported here)."""
    script = Path(find_spec(package).submodule_search_locations[0]) / '.mim' / 'tools' / 'train.py'
    assert script.is_file(), script
    return str(script)


def toy_data(kind: str, out: Path, size: int, num_train: int = 4) -> Path:
    """A toy set made by the checkout's generator (the only thing the checkout provides)."""
    subprocess.run([sys.executable, str(ROOT / 'tools' / f'make_toy_{kind}.py'), '--out',
                    str(out), '--num-train', str(num_train), '--num-val', '2',
                    '--size', str(size)],
                   check=True, capture_output=True, timeout=TIMEOUT)
    return out


DET_CONFIG = """\
# mmdet's own Mask R-CNN with mmhat's backbone, optimizer wrapper and hooks, by scope
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

data_root = '{data}/'
metainfo = dict(classes=('circle', 'square', 'triangle'))
# heads narrowed and fewer proposals/RoIs, as in configs/det/maskrcnn_hatnet_t_toy.py: with
# the full heads one bf16 step took 65 s on 2 busy cores, 7 s with these
c = 64
model = dict(
    backbone=dict(_delete_=True, type='mmhat.HATNet', arch='tiny', init_cfg=None),
    neck=dict(in_channels=[48, 96, 240, 384], out_channels=c),
    rpn_head=dict(in_channels=c, feat_channels=c),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=c),
        bbox_head=dict(in_channels=c, fc_out_channels=256, num_classes=3),
        mask_roi_extractor=dict(out_channels=c),
        mask_head=dict(in_channels=c, conv_out_channels=c, num_classes=3)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=200, max_per_img=100),
                   rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=100), rcnn=dict(max_per_img=20)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(160, 160), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(160, 160), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline,
                 ann_file='annotations/instances_train.json', data_prefix=dict(img='train/')))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline,
                 ann_file='annotations/instances_val.json', data_prefix=dict(img='val/')))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json',
                     metric=['bbox', 'segm'])
test_evaluator = val_evaluator

train_cfg = dict(max_epochs=3, val_interval=3)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=3)]
optim_wrapper = dict(
    type='mmhat.BF16AutocastOptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, weight_decay=1e-4),
    clip_grad=dict(max_norm=10.0))
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
custom_hooks = [dict(type='mmhat.EpochSeedHook'), dict(type='mmhat.ResumeCompatHook')]
randomness = dict(seed=0)
"""

SEG_CONFIG = """\
# mmseg's own Semantic FPN with mmhat's backbone and hook, by scope (and mmseg's SGD)
_base_ = 'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py'

data_root = '{data}/'
metainfo = dict(classes=('background', 'circle', 'square', 'triangle'),
                palette=[(0, 0, 0), (220, 20, 60), (0, 130, 230), (20, 200, 60)])
norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN cannot run on CPU
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=(128, 128)),
    backbone=dict(_delete_=True, type='mmhat.HATNet', arch='tiny', init_cfg=None),
    neck=dict(in_channels=[48, 96, 240, 384]),
    decode_head=dict(num_classes=4, norm_cfg=norm_cfg))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs'),
]
dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo,
               img_suffix='.png', seg_map_suffix='.png', reduce_zero_label=False)
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(**dataset, pipeline=train_pipeline,
                 data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train')))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(**dataset, pipeline=test_pipeline,
                 data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val')))
test_dataloader = val_dataloader

train_cfg = dict(max_iters=4, val_interval=4)
param_scheduler = [dict(type='PolyLR', power=0.9, eta_min=0.0, begin=0, end=4, by_epoch=False)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
custom_hooks = [dict(type='mmhat.ResumeCompatHook')]
randomness = dict(seed=0)
"""

#: the first run stops early and skips validation; the resumed run validates at its end
NO_VALIDATION = ['val_dataloader=None', 'val_cfg=None', 'val_evaluator=None']


def train_stop_resume(package: str, config: Path, work_dir: Path, stop_at: str, cwd: Path,
                      env: Dict[str, str]) -> str:
    """Train with ``package``'s own train.py until ``stop_at`` (a ``--cfg-options`` item),
    then ``--resume`` to the end of the config's schedule; return the resumed run's log."""
    script = own_train_script(package)
    first = run([script, str(config), '--work-dir', str(work_dir), '--cfg-options', stop_at,
                 *NO_VALIDATION], cwd, env)
    assert 'Weights only load failed' not in first.stdout + first.stderr
    resumed = run([script, str(config), '--work-dir', str(work_dir), '--resume'], cwd, env)
    log = resumed.stdout + resumed.stderr
    assert 'Weights only load failed' not in log
    return log


@pytest.mark.slow
def test_mmdet_own_train_py_trains_and_resumes(elsewhere, env, tmp_path):
    """(c) 2 epochs of 1 iteration (bf16 autocast), stopped; ``--resume`` runs epoch 3 and
    evaluates."""
    data = toy_data('coco', tmp_path / 'toy_coco', size=160, num_train=2)
    config = elsewhere / 'maskrcnn_hatnet_t_mine.py'
    config.write_text(DET_CONFIG.format(data=data))
    work_dir = tmp_path / 'work_det'
    log = train_stop_resume('mmdet', config, work_dir, 'train_cfg.max_epochs=2', elsewhere, env)

    assert 'resumed epoch: 2, iter: 2' in log
    assert re.search(r'Epoch\(train\)\s*\[3\]\[1/1\]', log)
    assert not re.search(r'Epoch\(train\)\s*\[[12]\]', log)  # nothing trained twice
    assert 'coco/bbox_mAP' in log and 'coco/segm_mAP' in log
    assert (work_dir / 'epoch_3.pth').is_file()
    assert (work_dir / 'last_checkpoint').read_text().strip().endswith('epoch_3.pth')


@pytest.mark.slow
def test_mmseg_own_train_py_trains_and_resumes(elsewhere, env, tmp_path):
    """(d) 2 iterations, stopped; ``--resume`` runs iterations 3-4 and evaluates."""
    data = toy_data('ade', tmp_path / 'toy_ade', size=128)
    config = elsewhere / 'fpn_hatnet_t_mine.py'
    config.write_text(SEG_CONFIG.format(data=data))
    work_dir = tmp_path / 'work_seg'
    log = train_stop_resume('mmseg', config, work_dir, 'train_cfg.max_iters=2', elsewhere, env)

    assert re.search(r'resumed epoch: \d+, iter: 2', log)
    assert re.search(r'Iter\(train\)\s*\[4/4\]', log)
    assert not re.search(r'Iter\(train\)\s*\[[12]/4\]', log)  # nothing trained twice
    assert 'mIoU' in log
    assert (work_dir / 'iter_4.pth').is_file()
    assert (work_dir / 'last_checkpoint').read_text().strip().endswith('iter_4.pth')
