"""Train a detector or segmentor with an mmhat backbone (mmengine Runner).

    python tools/train.py configs/det/maskrcnn_hatnet_s_coco.py [--work-dir DIR]
        [--resume [CKPT]] [--amp] [--data-root DIR] [--cfg-options k=v ...]
        [--launcher {none,pytorch,slurm,mpi}]
"""
import argparse
import os
import sys
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

from mmengine.config import DictAction  # noqa: E402

from mmhat.checkpoint import CheckpointError  # noqa: E402
from mmhat.engine import (check_checkpoints, check_data, latest_complete_checkpoint,  # noqa: E402
                          prepare_config, resumable_checkpoints, setup_cpu_distributed,
                          use_atomic_checkpoints)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go '
                        '(default: ./work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from CKPT, or from the latest checkpoint of the work dir '
                        'when no path is given')
    parser.add_argument('--amp', action='store_true', help='mixed precision (fp16 on GPU, '
                        'bf16 autocast on CPU)')
    parser.add_argument('--data-root', help='dataset folder, replacing the config\'s data_root')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config keys, e.g. train_cfg.max_epochs=1')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser.parse_args(argv)


def configure_amp(cfg) -> None:
    import torch
    wrapper = cfg.optim_wrapper
    if torch.cuda.is_available():
        wrapper.type = 'AmpOptimWrapper'
        wrapper.setdefault('loss_scale', 'dynamic')
    else:
        wrapper.type = 'mmhat.BF16AutocastOptimWrapper'


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = prepare_config(args)
    try:
        check_data(cfg, splits=('train', 'val'))
        if args.resume is None:
            check_checkpoints(cfg)
    except (FileNotFoundError, CheckpointError) as e:  # DataNotFoundError included
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.amp:
        configure_amp(cfg)
    use_atomic_checkpoints(cfg)
    if args.resume == 'auto':
        path, note = latest_complete_checkpoint(cfg.work_dir)
        if note:
            print(f'warning: {note}', file=sys.stderr)
        if path is None:
            print(f'--resume: no complete checkpoint in {cfg.work_dir}; starting from scratch',
                  file=sys.stderr)
        cfg.resume, cfg.load_from = path is not None, path
    elif args.resume is not None:
        if not os.path.isfile(args.resume):
            print(f'error: --resume checkpoint not found: {args.resume}', file=sys.stderr)
            return 2
        cfg.resume, cfg.load_from = True, args.resume

    setup_cpu_distributed(cfg)
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    try:
        runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
        with resumable_checkpoints():  # --resume / load_from, safely on every torch (2.1-2.13)
            runner.train()
    except CheckpointError as e:  # a failed download or a file of another model, at init
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
