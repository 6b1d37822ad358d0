"""ImageNet classifiers through mmpretrain (configs/cls/): the official models' logits, the
official checkpoints loaded whole and strictly, the evaluation command on a toy ImageNet-format
set and a fine-tune under mmpretrain's own train.py."""
import glob
import json
import os
import os.path as osp
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

import reference as R
from mmhat.checkpoint import CheckpointError
from mmhat.models.layers import set_fused_attn, use_fused_attn
from mmpretrain.registry import MODELS
from mmpretrain.utils import register_all_modules

register_all_modules(init_default_scope=False)


@pytest.fixture(autouse=True)
def mmpretrain_scope():
    """Build in mmpretrain's scope, whatever scope a test before this one (in the same
    process) left as mmengine's default (mmdet, mmseg)."""
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        yield

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in glob.glob(str(ROOT / 'configs/cls/*_in1k.py')))
#: config stem -> reference variant (family-arch)
CASES = {'hatnet_t_in1k': 'hatnet-tiny', 'transcnn_t_in1k': 'transcnn-tiny',
         'shunted_t_in1k': 'shunted-tiny', 'groupmixformer_m_in1k': 'groupmixformer-mini'}
ARCH = {'t': 'tiny', 's': 'small', 'm': 'medium', 'l': 'large', 'b': 'base'}
REFERENCE_FAMILY = {'hatnet': 'hatnet', 'transcnn': 'transcnn', 'shunted': 'shunted',
                    'groupmixformer': 'groupmixformer'}


def variant_of(config: str) -> str:
    family, short, _ = Path(config).stem.split('_')
    arch = 'mini' if (family, short) == ('groupmixformer', 'm') else ARCH[short]
    return f'{REFERENCE_FAMILY[family]}-{arch}'


def build(config, checkpoint=None, **head):
    cfg = Config.fromfile(config)
    for part in (cfg.model.backbone, cfg.model.head):
        part.init_cfg = (dict(type='Pretrained', checkpoint=str(checkpoint))
                         if checkpoint else None)
    cfg.model.head.update(head)
    return MODELS.build(cfg.model)


def test_sixteen_configs_one_per_official_variant():
    variants = sorted(variant_of(c) for c in CONFIGS)
    manifests = sorted(p.stem for p in (R.DATA / 'manifests').glob('*.json'))
    assert variants == manifests and len(variants) == 16


@pytest.mark.parametrize('config', CONFIGS, ids=[Path(c).stem for c in CONFIGS])
def test_config_builds_the_official_classifier(config):
    """Exactly the official classifier's parameters (less HAT-Net's never-used proj_norm,
    which the loader drops); the head reads the backbone's last map; the checkpoint the head
    loads is the backbone's."""
    cfg = Config.fromfile(config)
    assert cfg.model.head.init_cfg == cfg.model.backbone.init_cfg
    assert cfg.model.head.init_cfg['type'] == 'Pretrained'
    manifest = R.manifest(variant_of(config))
    model = build(config)
    unused = sum(torch.Size(v['shape']).numel() for k, v in manifest['state_dict'].items()
                 if '.attn.proj_norm.' in k)
    assert sum(p.numel() for p in model.parameters()) == manifest['params_total'] - unused
    assert model.head.in_channels == model.backbone.out_channels[-1]
    assert model.head.num_classes == 1000


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp('official')
    return {stem: R.write_official_checkpoint(name, root / f'{name}.pth')
            for stem, name in CASES.items()}


PATHS = [(stem, fused) for stem in CASES for fused in (True, False)]


@pytest.mark.parametrize('stem,fused', PATHS,
                         ids=[f'{s}-{"fused" if f else "explicit"}' for s, f in PATHS])
def test_logits_equal_official_in_float64(stem, fused, official):
    """Built from its config, the official-format checkpoint loaded through the config's
    init_cfg (backbone and head), in float64: the official classifier's logits at 1e-7."""
    case = R.load_case(CASES[stem])
    model = build(str(ROOT / f'configs/cls/{stem}.py'), official[stem])
    model.init_weights()
    model.eval().double()
    before = use_fused_attn()
    try:
        set_fused_attn(fused)
        with torch.no_grad():
            logits = model(case['input'].double(), mode='tensor')
    finally:
        set_fused_attn(before)
    ref = case['logits']
    assert logits.dtype == torch.float64 and logits.shape == ref.shape == (1, 1000)
    assert ((logits - ref).abs().max() / ref.abs().max()).item() <= R.FLOAT64_REL


def test_head_load_errors_say_what_to_change(official, tmp_path):
    config = str(ROOT / 'configs/cls/hatnet_t_in1k.py')
    model = build(config, official['hatnet_t_in1k'], num_classes=10)
    with pytest.raises(CheckpointError, match=r'(?s)fc.weight: checkpoint \(1000, 384\) vs '
                                              r'model \(10, 384\).*classifies 1000 classes, '
                                              r'this head 10: to fine-tune .*init_cfg=None'):
        model.head.init_weights()
    # another family's official checkpoint holds no HAT-Net classifier
    model = build(config, official['shunted_t_in1k'])
    with pytest.raises(CheckpointError, match='holds no classifier of an official HATNet'):
        model.head.init_weights()
    # GroupMixFormer's head without its norm: the checkpoint's norm4 keys are unexpected
    model = build(str(ROOT / 'configs/cls/groupmixformer_m_in1k.py'),
                  official['groupmixformer_m_in1k'], norm_cfg=None)
    with pytest.raises(CheckpointError, match='unexpected keys: norm.weight'):
        model.head.init_weights()
    with pytest.raises(ValueError, match="family='Swin'"):
        build(config, family='Swin')


def test_an_mmpretrain_checkpoint_of_the_classifier_loads_too(official, tmp_path):
    """A classifier fine-tuned by mmpretrain (backbone.* and head.* keys) loads back through
    the same init_cfg path, and equals the model it was saved from."""
    config = str(ROOT / 'configs/cls/shunted_t_in1k.py')
    model = build(config, official['shunted_t_in1k'])
    model.init_weights()
    path = tmp_path / 'epoch_1.pth'
    torch.save({'meta': {}, 'state_dict': model.state_dict()}, path)
    again = build(config, path)
    again.init_weights()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)


def _run(args, cwd, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc


@pytest.fixture(scope='module')
def toy_imagenet(tmp_path_factory):
    out = tmp_path_factory.mktemp('toy') / 'toy_imagenet'
    proc = _run([str(ROOT / 'tools/make_toy_imagenet.py'), '--out', str(out)], ROOT)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_eval_command_prints_the_metric_of_the_official_checkpoint(official, toy_imagenet,
                                                                   tmp_path):
    """tools/test.py with a classification config and an official checkpoint: the top-1 it
    prints is that of the official classifier on the set (labels chosen so that exactly 5
    of 12 are its own predictions: 41.67%)."""
    import shutil
    data = tmp_path / 'toy'
    shutil.copytree(toy_imagenet, data)
    config = str(ROOT / 'configs/cls/hatnet_t_in1k.py')
    # the classifier's predictions on the val images, through the config's own pipeline
    cfg = Config.fromfile(config)
    from mmengine.dataset import pseudo_collate
    from mmpretrain.registry import DATASETS
    dataset = DATASETS.build(dict(cfg.test_dataloader.dataset, data_root=str(data)))
    model = build(config, official['hatnet_t_in1k'])
    model.init_weights()
    model.eval()
    with torch.no_grad():
        preds = [int(s.pred_label) for i in range(len(dataset))
                 for s in model.test_step(pseudo_collate([dataset[i]]))]
    assert len(preds) == 12
    lines = [f'{i:06d}.png {p if i < 5 else (p + 1) % 1000}' for i, p in enumerate(preds)]
    (data / 'meta' / 'val.txt').write_text('\n'.join(lines) + '\n')
    proc = _run([str(ROOT / 'tools/test.py'), config, str(official['hatnet_t_in1k']),
                 '--data-root', str(data), '--work-dir', str(tmp_path / 'wd'),
                 '--cfg-options', 'test_dataloader.num_workers=0',
                 'test_dataloader.batch_size=4'], ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert 'OfficialClsHead: loaded 2 tensors of the official HATNet classifier' in log
    assert 'accuracy/top1: 41.6667' in log, log[-2000:]


@pytest.mark.slow
def test_fine_tune_under_mmpretrains_train_py_lowers_the_loss(official, toy_imagenet,
                                                              tmp_path):
    """mmpretrain's own tools/train.py, the toy config fine-tuning from an official-format
    checkpoint: the last epoch's mean loss is below the first's and top-1 above chance."""
    import mmpretrain
    train_py = Path(mmpretrain.__file__).parent / '.mim' / 'tools' / 'train.py'
    assert train_py.is_file(), f'mmpretrain ships its train.py at {train_py}'
    child = tmp_path / 'finetune.py'
    child.write_text(
        f"_base_ = {str(ROOT / 'configs/cls/hatnet_t_toy.py')!r}\n"
        f"data_root = {str(toy_imagenet)!r}\n"
        "train_dataloader = dict(dataset=dict(data_root=data_root))\n"
        "val_dataloader = dict(dataset=dict(data_root=data_root))\n"
        "test_dataloader = val_dataloader\n"
        "model = dict(backbone=dict(init_cfg=dict(_delete_=True, type='Pretrained', "
        f"checkpoint={str(official['hatnet_t_in1k'])!r})))\n")
    work = tmp_path / 'work'
    proc = _run([str(train_py), str(child), '--work-dir', str(work)], ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scalars = sorted(work.glob('*/vis_data/scalars.json'))
    assert scalars, f'no scalars.json under {work}'
    records = [json.loads(line) for line in scalars[-1].read_text().splitlines()]
    losses = {}
    for r in records:
        if 'loss' in r:
            losses.setdefault(r['epoch'], []).append(r['loss'])
    first, last = min(losses), max(losses)
    assert last == 4 and len(losses[first]) == 6
    mean = {e: sum(v) / len(v) for e, v in losses.items()}
    assert mean[last] < 0.9 * mean[first], mean
    top1 = [r['accuracy/top1'] for r in records if 'accuracy/top1' in r]
    assert top1 and top1[-1] > 100 / 3, top1
    # the checkpoint it wrote evaluates to the same top-1 with mmhat's tools/test.py
    proc = _run([str(ROOT / 'tools/test.py'), str(child), str(work / 'epoch_4.pth'),
                 '--work-dir', str(tmp_path / 'test')], ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f'accuracy/top1: {top1[-1]:.4f}' in proc.stdout + proc.stderr
