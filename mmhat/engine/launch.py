"""What ``tools/train.py`` and ``tools/test.py`` share: config preparation and data checks."""
import os
import os.path as osp
from argparse import Namespace
from typing import Iterator, List, Tuple

from mmengine.config import Config, ConfigDict

PREPARE = {
    'CocoDataset': (
        'COCO 2017 is expected under {root} (override with --data-root):\n'
        '  {root}/annotations/instances_train2017.json, instances_val2017.json\n'
        '  {root}/train2017/*.jpg, {root}/val2017/*.jpg\n'
        'Download train2017.zip, val2017.zip and annotations_trainval2017.zip from\n'
        'https://cocodataset.org/#download and unzip them there (README: "Data preparation").'),
    'ADE20KDataset': (
        'ADE20K (SceneParsing 2016) is expected under {root} (override with --data-root):\n'
        '  {root}/images/{{training,validation}}/*.jpg\n'
        '  {root}/annotations/{{training,validation}}/*.png\n'
        'Download ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/ and unzip it\n'
        'into the parent folder (README: "Data preparation").'),
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
        prefix = ds.get('data_prefix') or {}
        paths += [osp.join(root, p) for p in prefix.values() if isinstance(p, str) and p]
        missing = [p for p in paths if not osp.exists(p)] or ([root] if root and not osp.isdir(root) else [])
        if missing and (ds.get('type'), root) not in seen:
            seen.add((ds.get('type'), root))
            how = PREPARE.get(str(ds.get('type')).split('.')[-1], 'See the README, "Data preparation".')
            problems.append(f'{split} data of type {ds.get("type")} not found: missing '
                            f'{", ".join(missing[:3])}\n{how.format(root=root.rstrip("/"))}')
    if problems:
        raise DataNotFoundError('\n\n'.join(problems))


def _pretrained_paths(node) -> Iterator[str]:
    if isinstance(node, dict):
        init_cfg = node.get('init_cfg')
        for cfg in (init_cfg if isinstance(init_cfg, list) else [init_cfg]):
            if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained' and cfg.get('checkpoint'):
                yield cfg['checkpoint']
        for key, value in node.items():
            if key != 'init_cfg':
                yield from _pretrained_paths(value)
    elif isinstance(node, list):
        for item in node:
            yield from _pretrained_paths(item)


def check_checkpoints(cfg: Config) -> None:
    """Raise ``FileNotFoundError`` if a local ``Pretrained`` checkpoint of the model is
    missing (URLs are downloaded by the runner), before any work starts."""
    missing = [p for p in _pretrained_paths(cfg.get('model', {}))
               if '://' not in p and not osp.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f'pretrained checkpoint not found: {", ".join(missing)}. Download the official '
            f'ImageNet checkpoint (README: "Model zoo" says where each one is published) to '
            f'that path, or train from scratch with '
            f'--cfg-options model.backbone.init_cfg=None')


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
