"""What ``tools/train.py`` and ``tools/test.py`` share: config preparation and data checks."""
import os
import os.path as osp
from argparse import Namespace
from typing import Any, Iterator, List, Optional, Tuple

from mmengine.config import Config, ConfigDict

from mmhat.checkpoint import check_checkpoint_source

PREPARE = {
    'CocoDataset': (
        'COCO 2017 is expected under {root} (override with --data-root):\n'
        '  {root}/annotations/instances_train2017.json, instances_val2017.json\n'
        '  {root}/train2017/*.jpg, {root}/val2017/*.jpg\n'
        'Download train2017.zip, val2017.zip and annotations_trainval2017.zip from\n'
        'https://cocodataset.org/#download and unzip them there (docs/data_preparation.md).'),
    'ADE20KDataset': (
        'ADE20K (SceneParsing 2016) is expected under {root} (override with --data-root):\n'
        '  {root}/images/{{training,validation}}/*.jpg\n'
        '  {root}/annotations/{{training,validation}}/*.png\n'
        'Download ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/ and unzip it\n'
        'into the parent folder (docs/data_preparation.md).'),
    'ImageNet': (
        'ImageNet-1k is expected under {root} in mmpretrain\'s layout (override with --data-root):\n'
        '  {root}/val/*.JPEG with {root}/meta/val.txt ("<file> <label>" per line)\n'
        '  {root}/train/<wnid>/*.JPEG with {root}/meta/train.txt\n'
        'Download ILSVRC2012 from https://image-net.org/ (docs/imagenet.md says how to lay it out).'),
}


class DataNotFoundError(FileNotFoundError):
    """A dataset of the config is not where the config says."""


def _datasets(cfg: Config, splits) -> Iterator[Tuple[str, ConfigDict]]:
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if not loader:
            continue
        dataset = loader.get('dataset')
        while isinstance(dataset, dict) and 'dataset' in dataset:  # RepeatDataset & co.
            dataset = dataset['dataset']
        datasets = dataset.get('datasets', [dataset]) if isinstance(dataset, dict) else []
        for ds in datasets:
            yield split, ds


def check_data(cfg: Config, splits=('train', 'val', 'test')) -> None:
    """Raise :class:`DataNotFoundError` with preparation steps if a dataset is missing."""
    problems: List[str] = []
    seen = set()
    for split, ds in _datasets(cfg, splits):
        root = ds.get('data_root') or ''
        paths = []
        if ds.get('ann_file'):
            paths.append(osp.join(root, ds['ann_file']))
        prefix = ds.get('data_prefix') or ds.get('split') or {}  # mmpretrain: a folder name
        prefix = {'img': prefix} if isinstance(prefix, str) else prefix
        paths += [osp.join(root, p) for p in prefix.values() if isinstance(p, str) and p]
        missing = [p for p in paths if not osp.exists(p)] or ([root] if root and not osp.isdir(root) else [])
        if missing and (ds.get('type'), root) not in seen:
            seen.add((ds.get('type'), root))
            how = PREPARE.get(str(ds.get('type')).split('.')[-1], 'See docs/data_preparation.md.')
            problems.append(f'{split} data of type {ds.get("type")} not found: missing '
                            f'{", ".join(missing[:3])}\n{how.format(root=root.rstrip("/"))}')
    if problems:
        raise DataNotFoundError('\n\n'.join(problems))


def _pretrained_checkpoints(node, where: str = 'model') -> Iterator[Tuple[str, str, Any]]:
    """``(config key, checkpoint, type of the module it initialises)`` for every ``Pretrained``
    ``init_cfg`` and every ``pretrained=`` (mmseg's segmentor passes its own to the backbone)."""
    if isinstance(node, dict):
        if isinstance(node.get('pretrained'), str):
            backbone = node.get('backbone')
            target = backbone.get('type') if isinstance(backbone, dict) else node.get('type')
            yield f'{where}.pretrained', node['pretrained'], target
        init_cfg = node.get('init_cfg')
        for cfg in (init_cfg if isinstance(init_cfg, list) else [init_cfg]):
            if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained' and cfg.get('checkpoint'):
                yield f'{where}.init_cfg', cfg['checkpoint'], node.get('type')
        for key, value in node.items():
            if key != 'init_cfg':
                yield from _pretrained_checkpoints(value, f'{where}.{key}')
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _pretrained_checkpoints(item, f'{where}[{i}]')


def _mmhat_name(type_: Any) -> Optional[str]:
    """``'mmhat.HATNet'`` if ``type_`` (a config's ``type``) is an mmhat backbone, else None."""
    from mmhat.registry import MODELS
    if isinstance(type_, type):
        return f'mmhat.{type_.__name__}' if type_.__module__.startswith('mmhat.') else None
    if not isinstance(type_, str):
        return None
    name = type_[len('mmhat.'):] if type_.startswith('mmhat.') else type_
    MODELS.import_from_location()
    return f'mmhat.{name}' if (type_.startswith('mmhat.') or name in MODELS.module_dict) else None


def check_checkpoints(cfg: Config) -> None:
    """Check the model's ``Pretrained`` checkpoints before any work starts (URLs are
    downloaded by the runner).

    Raises:
        CheckpointError: an mmhat backbone is given another model's checkpoint
            (``open-mmlab://``, ``torchvision://``, ...: what mmseg's ``model.pretrained``
            and mmdet's R50 ``init_cfg`` put there), with the key that holds it and the fix.
        FileNotFoundError: a local checkpoint is missing.
    """
    found = list(_pretrained_checkpoints(cfg.get('model', {})))
    for where, checkpoint, target in found:
        name = _mmhat_name(target)
        if name:
            check_checkpoint_source(checkpoint, name, origin=where)
    missing = [(where, p) for where, p, _ in found if '://' not in p and not osp.isfile(p)]
    if missing:
        injected = [p for where, p in missing if where.endswith('.pretrained')]
        raise FileNotFoundError(
            f'pretrained checkpoint not found: {", ".join(p for _, p in missing)}. Download the '
            f'official ImageNet checkpoint (docs/model_zoo.md, "Checkpoints", says where each '
            f'one is published) to that path, or train from scratch with '
            f'--cfg-options model.backbone.init_cfg=None'
            + (f'. {", ".join(injected)} is model.pretrained, which mmseg\'s base configs set '
               f'for their own backbone: if you did not, add model.pretrained=None'
               if injected else ''))


def route_test_checkpoint(cfg: Config, checkpoint: str) -> str:
    """Point ``cfg`` at the checkpoint ``tools/test.py`` was given; returns how it is loaded.

    * A checkpoint of a whole trained model (mmengine's ``state_dict`` with ``backbone.``
      keys, written by ``tools/train.py`` or mmpretrain): ``load_from``, as mmengine does.
    * An official ImageNet checkpoint (``{'model': ...}`` with the authors' key names) and a
      classification config (``mmhat.OfficialClsHead``): the backbone and the head read it
      through their ``init_cfg``, strictly, converting the names (mmengine's ``load_from``
      would match none of them and evaluate random weights without an error).

    Raises:
        CheckpointError: an official backbone checkpoint given with a detection or
            segmentation config (it holds no detector), saying where it belongs.
    """
    from mmhat.checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file
    sd = extract_state_dict(load_checkpoint_file(checkpoint), prefix='')
    if any(key.startswith('backbone.') for key in sd):
        cfg.load_from = checkpoint
        return 'load_from'
    model = cfg.get('model', {})
    head = model.get('head') if isinstance(model, dict) else None
    if isinstance(head, dict) and str(head.get('type', '')).endswith('OfficialClsHead'):
        for part in (model['backbone'], head):
            part['init_cfg'] = dict(type='Pretrained', checkpoint=checkpoint)
        cfg.load_from = None
        return 'init_cfg'
    raise CheckpointError(
        f'{checkpoint} is not a checkpoint of a whole trained model (no backbone.* keys): it '
        f'looks like an ImageNet backbone checkpoint. tools/test.py evaluates a trained model: '
        f'give it the checkpoint tools/train.py wrote (work_dirs/<config>/epoch_*.pth or '
        f'iter_*.pth). An ImageNet checkpoint belongs in model.backbone.init_cfg to train '
        f'from, or with a configs/cls/ config to check its ImageNet accuracy.')


def _replace_root(node, old: str, new: str):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ('data_root', 'ann_file') and isinstance(value, str) and value.startswith(old):
                node[key] = new + value[len(old):]
            else:
                _replace_root(value, old, new)
    elif isinstance(node, list):
        for item in node:
            _replace_root(item, old, new)


def prepare_config(args: Namespace) -> Config:
    """Load ``args.config`` and apply the command-line options shared by the tools."""
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config file not found: {args.config}')
    cfg = Config.fromfile(args.config)
    if getattr(args, 'cfg_options', None):
        cfg.merge_from_dict(args.cfg_options)
    if getattr(args, 'data_root', None):
        new = args.data_root.rstrip('/') + '/'
        old = cfg.get('data_root')
        if not old:
            raise ValueError(f'{args.config} has no top-level data_root to replace')
        # data_root and the evaluators' ann_file were expanded when the config was read
        _replace_root(cfg._cfg_dict, old.rstrip('/'), new.rstrip('/'))
        cfg.data_root = new
    cfg.launcher = getattr(args, 'launcher', 'none')
    if getattr(args, 'work_dir', None):
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    os.makedirs(cfg.work_dir, exist_ok=True)
    return cfg


def setup_cpu_distributed(cfg: Config) -> None:
    """Make ``--launcher pytorch`` work where torch has no CUDA (gloo), as on CI.

    mmengine 0.10.7 calls ``torch.cuda.set_device`` when it initialises the process group
    and wraps the model in DDP with GPU ``device_ids``; both fail on a CPU-only torch.
    Initialising gloo first (mmengine then skips its own init) and wrapping without
    ``device_ids`` fixes both. With CUDA available nothing changes (NCCL as usual).
    """
    import torch
    import torch.distributed as dist
    if cfg.get('launcher', 'none') == 'none' or torch.cuda.is_available():
        return
    if cfg.launcher != 'pytorch':
        raise RuntimeError(f'--launcher {cfg.launcher} without CUDA is not supported; use '
                           f'torchrun with --launcher pytorch for CPU (gloo) runs')
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    wrapper = dict(cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel', broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False)))
    wrapper['device_ids'] = None  # a CPU module: DDP must not be given GPU ids
    cfg.model_wrapper_cfg = wrapper
