"""Every config of the repo loads and builds; necks and decode heads fit their backbones;
the model zoo is complete and each config carries its own variant's checkpoint and drop path;
one training step runs per head type; tools give clear errors when data is missing."""
import copy
import functools
import re
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope, init_default_scope

import backbone_contract as contract
from mmhat.registry import MODELS as MMHAT_MODELS

ROOT = Path(__file__).parents[1]
CONFIGS = sorted(p for p in (ROOT / 'configs').rglob('*.py')
                 if '_base_' not in p.parts and 'cls' not in p.parts)
# The classifiers (mmpretrain) are built by tests/cls/, where mmpretrain is installed; here
# they are only read.
CLS_CONFIGS = sorted((ROOT / 'configs' / 'cls').glob('*.py'))

# The model zoo: `{head}_{family}_{variant}[_{schedule}]_{dataset}.py`, the family named by
# its `reference_name`, the variant by the first letter of its arch name; the default
# schedule (1x, Semantic FPN 80k, UperNet 160k) is left out of the name.
FAMILIES = {cls.reference_name: cls for cls in contract.families()}
ARCHS = {name: {arch[0]: arch for arch in cls.arch_zoo} for name, cls in FAMILIES.items()}
# "Base-size": the variant of 40-50 M parameters, the size of Swin-S / PVT-M; with the small
# ones they get the 3x multi-scale schedule.
BASE_SIZE = {name: cls.base_size_arch[0] for name, cls in FAMILIES.items()}
# Families whose norm is BatchNorm: their COCO/ADE20K configs synchronise it across GPUs.
BN_FAMILIES = {name for name, cls in FAMILIES.items() if 'BN' in cls.default_norm_cfg['type']}
ZOO_NAME = re.compile(r'(?P<head>maskrcnn|retinanet|fpn|upernet)_(?P<family>[a-z]+)_'
                      r'(?P<variant>[a-z])(?:_(?P<schedule>3x))?_(?P<dataset>coco|ade20k)')
ZOO = [p for p in CONFIGS if ZOO_NAME.fullmatch(p.stem)]


def expected_zoo():
    """The config matrix of the model zoo: file stems."""
    names = set()
    for family, variants in ARCHS.items():
        for v in variants:
            names |= {f'maskrcnn_{family}_{v}_coco', f'retinanet_{family}_{v}_coco',
                      f'fpn_{family}_{v}_ade20k'}
        for v in ('s', BASE_SIZE[family]):
            names.add(f'maskrcnn_{family}_{v}_3x_coco')
        names.add(f'upernet_{family}_s_ade20k')
    return names


def expected_drop_path(family, variant):
    """The drop-path policy of configs/_base_/backbones: 0.1 up to the small size, 0.2 for
    the base size, 0.3 for large."""
    return 0.3 if variant == 'l' else 0.2 if variant == BASE_SIZE[family] else 0.1


@pytest.fixture(scope='module', autouse=True)
def fast_mm_config_lookup():
    """mmengine resolves every `mmdet::`/`mmseg::` base by parsing all ~400 metafiles of the
    package (~0.4 s each time); the answer only depends on the installed files, so remember it
    for the session of this module."""
    import mmengine.config.config as config_module
    lookup = config_module._get_external_cfg_path

    @functools.lru_cache(maxsize=None)
    def cached(package_path, cfg_file):
        try:
            return lookup(package_path, cfg_file), None
        except ValueError as e:
            return None, e

    def lookup_once(package_path, cfg_file):
        path, error = cached(package_path, cfg_file)
        if error is not None:
            raise error
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config_module, '_get_external_cfg_path', lookup_once)
        yield


@functools.lru_cache(maxsize=None)
def _load(path):
    return Config.fromfile(str(path))


def load(path) -> Config:
    """The config at ``path`` (parsed once per session; a copy, free to change)."""
    return copy.deepcopy(_load(Path(path)))


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


@pytest.mark.parametrize('path', CLS_CONFIGS, ids=[p.stem for p in CLS_CONFIGS])
def test_classification_config_reads_and_loads_one_checkpoint_whole(path):
    """Every configs/cls/ file parses without mmpretrain, names an mmhat backbone and
    mmhat.OfficialClsHead of the same family, and points the head at the backbone's checkpoint
    (the official file holds both), or trains both from scratch (the toy config)."""
    cfg = load(path)
    assert cfg.default_scope == 'mmpretrain' and cfg.model.type == 'ImageClassifier'
    backbone, head = cfg.model.backbone, cfg.model.head
    assert head.type == 'mmhat.OfficialClsHead' and backbone.type == f'mmhat.{head.family}'
    # checkpoints written by mmpretrain's own train.py load safely (tools/test.py, --resume)
    assert dict(type='mmhat.ResumeCompatHook') in cfg.custom_hooks
    # the head computes its family's official head (the table the FLOP counts use)
    from mmhat.models.heads import OFFICIAL_HEADS
    official = OFFICIAL_HEADS[head.family]
    assert head.get('dropout', 0.0) == official.get('dropout', 0.0)
    assert head.get('norm_cfg') == official.get('norm_cfg')
    if path.stem.endswith('_in1k'):
        assert head.init_cfg == backbone.init_cfg and head.init_cfg['type'] == 'Pretrained'
        assert head.num_classes == cfg.model.data_preprocessor.num_classes == 1000
    else:
        assert backbone.init_cfg is None and head.init_cfg['type'] != 'Pretrained'


def test_the_model_zoo_is_complete():
    """Mask R-CNN 1x, RetinaNet 1x and Semantic FPN for every variant; Mask R-CNN 3x for the
    small and base-size ones; UperNet for the small ones; nothing else under a zoo name."""
    assert {p.stem for p in ZOO} == expected_zoo()
    assert len(ZOO) == 60


@pytest.mark.parametrize('path', CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_and_heads_fit_backbone(path):
    cfg = load(path)
    model = build_model(cfg)
    backbone = model.backbone
    assert type(backbone).__module__.startswith('mmhat.'), type(backbone)
    out_channels = list(backbone.out_channels)
    if 'neck' in cfg.model:
        assert list(cfg.model.neck.in_channels) == out_channels
    if cfg.model.get('decode_head', {}).get('type') == 'UPerHead':
        assert list(cfg.model.decode_head.in_channels) == out_channels
        aux = cfg.model.auxiliary_head
        assert aux.in_index == 2 and aux.in_channels == out_channels[2]
    # the config's init_cfg is kept for init_weights (not loaded at build)
    assert cfg.model.backbone.get('init_cfg') == backbone.init_cfg


@pytest.mark.parametrize('path', ZOO, ids=[p.stem for p in ZOO])
def test_zoo_config_is_its_own_variant(path):
    """arch, checkpoint, drop path, norm and weight-decay exemptions of the named variant."""
    name = ZOO_NAME.fullmatch(path.stem)
    family, variant = name['family'], name['variant']
    backbone = load(path).model.backbone
    assert backbone.arch == ARCHS[family][variant]
    # the checkpoint file names the family and the variant: HAT-Net_Tiny.pth,
    # TransCNN-Tiny.pth, groupmixformer_m.pth, shunted_t.pth
    words = re.split(r'[-_]', Path(backbone.init_cfg.checkpoint).stem.lower())
    assert ''.join(words[:-1]) == family
    assert words[-1] in (variant, ARCHS[family][variant])
    assert backbone.drop_path_rate == expected_drop_path(family, variant)
    if family in BN_FAMILIES:
        assert backbone.norm_cfg == dict(type='SyncBN')
    else:
        assert 'norm_cfg' not in backbone  # GroupNorm(1), the paper's


@pytest.mark.parametrize('path', ZOO, ids=[p.stem for p in ZOO])
def test_zoo_config_exempts_norms_and_position_encodings_from_weight_decay(path):
    paramwise = load(path).optim_wrapper.paramwise_cfg
    assert paramwise.norm_decay_mult == 0.0
    custom = paramwise.get('custom_keys', {})
    family = FAMILIES[ZOO_NAME.fullmatch(path.stem)['family']]
    assert custom == {key: dict(decay_mult=0.0) for key in family.position_encoding_keys}


def test_groupmixformer_position_encodings_get_no_weight_decay():
    """The custom keys match the real parameter names: every `cpe` and `crpe` conv weight
    (and only those among the convs) lands in a group without weight decay."""
    from mmengine.optim import build_optim_wrapper
    cfg = load(ROOT / 'configs/seg/fpn_groupmixformer_m_ade20k.py')
    backbone = MMHAT_MODELS.build(dict(cfg.model.backbone, norm_cfg=dict(type='BN'),
                                       init_cfg=None))
    wrapper = build_optim_wrapper(backbone, cfg.optim_wrapper)
    decay = {id(p): group['weight_decay'] for group in wrapper.optimizer.param_groups
             for p in group['params']}
    names = dict(backbone.named_parameters())
    position = [n for n in names if '.cpe.' in n or '.crpe.' in n]
    assert len(position) == (1 + 3) * 2 * 22  # cpe, 3 crpe convs; weight, bias; 22 blocks
    assert all(decay[id(names[n])] == 0.0 for n in position)
    convs = [n for n, p in names.items() if p.dim() == 4 and n not in position]
    assert convs and all(decay[id(names[n])] == 1e-4 for n in convs)


@pytest.mark.parametrize('name', ['maskrcnn_hatnet_s_coco', 'retinanet_hatnet_s_coco'])
def test_recipe_of_detection_configs(name):
    cfg = load(ROOT / 'configs' / 'det' / f'{name}.py')
    lr = 2e-4 if name.startswith('maskrcnn') else 1e-4
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=lr, weight_decay=1e-4)
    warmup, steps = cfg.param_scheduler
    assert warmup.type == 'LinearLR' and warmup.end == 500 and not warmup.by_epoch
    assert steps.milestones == [8, 11] and cfg.train_cfg.max_epochs == 12
    assert cfg.train_dataloader.batch_size * 8 == 16
    assert cfg.model.backbone.drop_path_rate == 0.1
    assert cfg.model.backbone.init_cfg.checkpoint.endswith('/v2.0/HAT-Net_Small.pth')


def test_recipe_of_3x_detection_configs():
    """mmdet's Swin 3x recipe: AdamW 1e-4 / 0.05, 36 epochs, steps 27/33, 480-800 + crop."""
    cfg = load(ROOT / 'configs/det/maskrcnn_hatnet_m_3x_coco.py')
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                                               weight_decay=0.05)
    assert cfg.optim_wrapper.paramwise_cfg == dict(norm_decay_mult=0.0)
    warmup, steps = cfg.param_scheduler
    assert warmup.type == 'LinearLR' and warmup.end == 1000 and not warmup.by_epoch
    assert steps.milestones == [27, 33] and cfg.train_cfg.max_epochs == 36 == steps.end
    assert cfg.train_dataloader.batch_size * 8 == 16
    choice = next(t for t in cfg.train_dataloader.dataset.pipeline if t.type == 'RandomChoice')
    multi_scale, crop = choice.transforms
    assert [s[0] for s in multi_scale[0].scales] == list(range(480, 801, 32))
    assert [t.type for t in crop] == ['RandomChoiceResize', 'RandomCrop', 'RandomChoiceResize']
    assert cfg.pretrained is None  # not mmdet's Swin-T checkpoint
    assert cfg.model.backbone.init_cfg.checkpoint.endswith('/v2.0/HAT-Net_Medium.pth')


def test_recipe_of_segmentation_config():
    cfg = load(ROOT / 'configs' / 'seg' / 'fpn_hatnet_s_ade20k.py')
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=1e-4, weight_decay=1e-4)
    (poly, ) = cfg.param_scheduler
    assert poly.type == 'PolyLR' and poly.power == 0.9 and poly.end == 80000
    assert cfg.train_cfg.max_iters == 80000 and cfg.train_dataloader.batch_size * 4 == 16
    assert cfg.crop_size == (512, 512) and cfg.model.pretrained is None


def test_recipe_of_upernet_configs():
    """mmseg's Swin UperNet recipe: AdamW 6e-5 / 0.01, 1500 warm-up iterations, poly 1.0."""
    cfg = load(ROOT / 'configs/seg/upernet_transcnn_s_ade20k.py')
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999),
                                               weight_decay=0.01)
    warmup, poly = cfg.param_scheduler
    assert warmup.type == 'LinearLR' and warmup.end == 1500 and not warmup.by_epoch
    assert poly.type == 'PolyLR' and poly.power == 1.0 and (poly.begin, poly.end) == (1500,
                                                                                      160000)
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size * 8 == 16
    assert cfg.crop_size == (512, 512) and cfg.model.data_preprocessor.size == (512, 512)
    assert cfg.model.pretrained is None
    assert cfg.model.decode_head.num_classes == cfg.model.auxiliary_head.num_classes == 150


def _sync_bn_to_bn(node):
    """SyncBN needs a process group; on one CPU process the same layers are plain BN."""
    if isinstance(node, dict):
        if node.get('type') == 'SyncBN':
            node['type'] = 'BN'
        for value in node.values():
            _sync_bn_to_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _sync_bn_to_bn(value)


def _detection_batch(size):
    from mmdet.testing import demo_mm_inputs
    return demo_mm_inputs(batch_size=2, image_shapes=[(3, *size)] * 2, num_items=[3, 2],
                          num_classes=80, with_mask=True)


def _segmentation_batch(size):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=size, ori_shape=size, pad_shape=size))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, *size)))
        samples.append(sample)
    inputs = [torch.randint(0, 256, (3, *size), dtype=torch.uint8) for _ in range(2)]
    return dict(inputs=inputs, data_samples=samples)


# One config per head type, with the smallest variant of a family (the four families
# spread over the heads; UperNet configs exist for the small variants only).
TRAIN_STEP = ['det/maskrcnn_hatnet_t_coco.py', 'det/retinanet_transcnn_t_coco.py',
              'seg/fpn_groupmixformer_m_ade20k.py', 'seg/upernet_shunted_s_ade20k.py']


@pytest.mark.parametrize('config', TRAIN_STEP, ids=[Path(c).stem for c in TRAIN_STEP])
def test_one_training_step(config):
    """The config's model, data preprocessor and optimizer (paramwise settings included)
    run one forward/backward/update on 2 images of 128x160, without a checkpoint."""
    from mmengine.optim import build_optim_wrapper
    torch.manual_seed(0)
    cfg = load(ROOT / 'configs' / config)
    cfg.model.backbone.init_cfg = None  # no download
    _sync_bn_to_bn(cfg.model)
    size = (128, 160)
    if config.startswith('seg/'):
        cfg.model.data_preprocessor.size = size  # the 512x512 crop size would pad to 512
        data = _segmentation_batch(size)
    else:
        data = _detection_batch(size)
    model = build_model(cfg)
    model.init_weights()
    model.train()
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)

    data = model.data_preprocessor(data, True)
    losses = model(**data, mode='loss')
    loss, log_vars = model.parse_losses(losses)
    assert torch.isfinite(loss), log_vars
    wrapper.backward(loss)
    no_grad = [n for n, p in model.backbone.named_parameters()
               if p.requires_grad and p.grad is None]
    assert not no_grad, f'backbone parameters without a gradient: {no_grad[:5]}'
    before = [p.detach().clone() for p in model.backbone.parameters()]
    wrapper.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.backbone.parameters()))


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
    assert 'checkpoints/shunted_s.pth' in err and 'docs/model_zoo.md' in err
    assert 'Traceback' not in err


def readme_swap_configs():
    """The python blocks of the README's swap-in section, keyed by the scope they start from."""
    readme = (ROOT / 'README.md').read_text()
    section = readme.split('## Swap an mmhat backbone', 1)[1].split('\n## ', 1)[0]
    blocks = re.findall(r'```python\n(.*?)```', section, flags=re.S)
    return {block.split("'", 2)[1].split('::')[0]: block for block in blocks}


def test_readme_swap_section_covers_mmdet_and_mmseg():
    blocks = readme_swap_configs()
    assert set(blocks) == {'mmdet', 'mmseg'}
    assert 'pretrained=None' in blocks['mmseg']
    assert all('_delete_=True' in b and "'mmhat.ResumeCompatHook'" in b for b in blocks.values())


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_readme_swap_into_an_existing_mm_config(tmp_path, scope):
    """The README's blocks, as a user copies them, turn mmdet's/mmseg's own R50 configs into
    HAT-Net ones: they build, the neck fits, the checkpoint is the authors' and the hook
    resolves by its scoped name."""
    path = tmp_path / f'{scope}_swap.py'
    path.write_text(readme_swap_configs()[scope])
    cfg = Config.fromfile(str(path))
    model = build_model(cfg)
    assert type(model.backbone).__name__ == 'HATNet'
    assert list(cfg.model.neck.in_channels) == model.backbone.out_channels
    assert model.backbone.init_cfg['checkpoint'].endswith('/v2.0/HAT-Net_Small.pth')
    from mmhat.registry import HOOKS
    assert HOOKS.build(cfg.custom_hooks[0]).__class__.__name__ == 'ResumeCompatHook'


def test_get_flops_of_a_whole_segmentor():
    """The FLOPs of a whole model (tools/get_flops.py --config): the backbone's share equals
    the backbone measured alone at the same size."""
    from mmhat.utils.flops import backbone_flops, config_flops
    whole = config_flops(str(ROOT / 'configs/seg/fpn_hatnet_t_ade20k.py'), (256, 256))
    alone = backbone_flops('mmhat.HATNet', 'tiny', (256, 256))
    assert whole['input'] == '256x256'
    assert whole['backbone_gflops'] == pytest.approx(alone['gflops'], rel=1e-6)
    assert whole['gflops'] > whole['backbone_gflops'] > 0
    assert whole['params'] > alone['params']
