"""Evaluate a trained detector, segmentor or classifier (mmengine Runner).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--data-root DIR]
        [--out FILE.pkl] [--cfg-options k=v ...] [--launcher {none,pytorch,slurm,mpi}]

CHECKPOINT is what tools/train.py (or mmpretrain) wrote; with a classification config
(configs/cls/) it may also be the authors' official ImageNet checkpoint, which the backbone
and the classifier head then load strictly (docs/imagenet.md): top-1/top-5 are printed.
"""
import argparse
import os.path as osp
import sys
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

from mmengine.config import DictAction  # noqa: E402

from mmhat.checkpoint import CheckpointError  # noqa: E402
from mmhat.engine import (DataNotFoundError, check_data, prepare_config,  # noqa: E402
                          resumable_checkpoints, route_test_checkpoint, setup_cpu_distributed)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where the evaluation log goes')
    parser.add_argument('--data-root', help='dataset folder, replacing the config\'s data_root')
    parser.add_argument('--out', help='also dump the raw predictions to this pickle file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config keys')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not osp.isfile(args.checkpoint):
        print(f'error: checkpoint not found: {args.checkpoint}', file=sys.stderr)
        return 2
    cfg = prepare_config(args)
    try:
        check_data(cfg, splits=('test', ))
    except DataNotFoundError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    try:
        route = route_test_checkpoint(cfg, args.checkpoint)
    except CheckpointError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2

    setup_cpu_distributed(cfg)
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    if route == 'init_cfg':  # Runner.test() initialises nothing itself: load the official weights
        from mmengine.model import is_model_wrapper
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        model.init_weights()
    if args.out:
        from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
    with resumable_checkpoints():  # load_from, safely on every torch (2.1-2.13)
        runner.test()
    return 0


if __name__ == '__main__':
    sys.exit(main())
