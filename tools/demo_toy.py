"""End-to-end demo on embedded toy data: generate, train, evaluate, draw.

    python tools/demo_toy.py [--work-dir work_dirs/maskrcnn_hatnet_t_toy]
        [--data-root data/toy_coco] [--config configs/det/maskrcnn_hatnet_t_toy.py]
        [--image 0] [--score-thr 0.5] [--cfg-options k=v ...]

1. ``tools/make_toy_coco.py`` writes the synthetic shapes set (skipped when complete);
2. ``tools/train.py`` trains Mask R-CNN + HAT-Net-Tiny from scratch on the CPU (or GPU) and
   evaluates bbox/segm mAP with CocoMetric after the last epoch;
3. the last checkpoint predicts one validation image, drawn with boxes and masks by mmdet's
   ``DetLocalVisualizer`` into ``WORK_DIR/demo_pred.png``.

Needs no network and no pretrained weights. Prints where the work dir, checkpoint, metrics,
log and picture are, and the final mAP; exits non-zero with a message when a step fails.
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

TOOLS = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(TOOLS)
sys.path.insert(0, TOOLS)

from make_toy_coco import make_toy_coco  # noqa: E402


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where to look."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default=osp.join(ROOT, 'configs/det/maskrcnn_hatnet_t_toy.py'))
    parser.add_argument('--work-dir', default='work_dirs/maskrcnn_hatnet_t_toy')
    parser.add_argument('--data-root', default='data/toy_coco')
    parser.add_argument('--image', type=int, default=0,
                        help='index of the validation image to draw')
    parser.add_argument('--score-thr', type=float, default=0.5,
                        help='draw predictions above this score')
    parser.add_argument('--device', default=None, help='inference device (default: cuda if '
                        'available, else cpu)')
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        help='passed on to tools/train.py, e.g. train_cfg.max_epochs=2')
    return parser.parse_args(argv)


def train(args: argparse.Namespace) -> None:
    """Run ``tools/train.py`` in a child process: the demo's own process stays free of the
    Runner's global state (loggers, visualizer instances) and sees its exit status."""
    cmd = [sys.executable, osp.join(TOOLS, 'train.py'), args.config,
           '--work-dir', args.work_dir, '--data-root', args.data_root]
    if args.cfg_options:
        cmd += ['--cfg-options', *args.cfg_options]
    print('+ ' + ' '.join(cmd), flush=True)
    env = dict(os.environ)
    # OpenMP threads spin while they wait: on a small shared machine that burns the cores
    # the other threads need (measured 7 s instead of 3 s per step under contention)
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    status = subprocess.call(cmd, env=env)
    if status != 0:
        raise DemoError(f'training failed (exit status {status}); see the log above and '
                        f'{args.work_dir}/<timestamp>/<timestamp>.log')


def last_checkpoint(work_dir: str) -> str:
    """The checkpoint the Runner recorded last in ``WORK_DIR/last_checkpoint``."""
    marker = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(marker):
        raise DemoError(f'no checkpoint was written: {marker} is missing')
    with open(marker) as f:
        ckpt = f.read().strip()
    if not osp.isfile(ckpt):
        raise DemoError(f'{marker} names {ckpt}, which does not exist')
    return ckpt


def final_metrics(work_dir: str) -> Dict:
    """The last evaluation of the newest run in ``work_dir``.

    Returns:
        dict with ``scalars`` (the run's ``vis_data/scalars.json``), ``log`` (its text log)
        and ``metrics`` (the ``coco/*`` values of its last evaluation).
    """
    runs = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')),
                  key=osp.getmtime)
    for scalars in reversed(runs):
        with open(scalars) as f:
            evals = [row for row in map(json.loads, f) if 'coco/bbox_mAP' in row]
        if evals:
            run_dir = osp.dirname(osp.dirname(scalars))
            log = osp.join(run_dir, osp.basename(run_dir) + '.log')
            return dict(scalars=scalars, log=log, metrics=evals[-1])
    raise DemoError(f'no evaluation result (coco/bbox_mAP) under {work_dir}/*/vis_data/')


def draw_prediction(args: argparse.Namespace, checkpoint: str) -> str:
    """Predict one validation image and draw boxes and masks; return the PNG's path."""
    import mmcv
    import torch
    from mmdet.apis import inference_detector, init_detector
    from mmdet.registry import VISUALIZERS

    from mmhat.engine import resumable_checkpoints

    with open(osp.join(args.data_root, 'annotations', 'instances_val.json')) as f:
        images = json.load(f)['images']
    if not 0 <= args.image < len(images):
        raise DemoError(f'--image {args.image}: the validation set has {len(images)} images')
    img_path = osp.join(args.data_root, 'val', images[args.image]['file_name'])
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    with resumable_checkpoints():  # a training checkpoint, loaded by torch >= 2.6
        model = init_detector(args.config, checkpoint, device=device)
    result = inference_detector(model, img_path)
    # a name of our own (a Runner in this process may own 'visualizer'), no backends: the
    # picture goes to out_file only
    visualizer = VISUALIZERS.build(dict(type='DetLocalVisualizer', name='demo_toy'))
    visualizer.dataset_meta = model.dataset_meta
    out_file = osp.join(args.work_dir, 'demo_pred.png')
    img = mmcv.imread(img_path, channel_order='rgb')
    # labels are drawn in pixels: on a 160-pixel image they would hide the shapes, so the
    # picture (image and predictions alike) is enlarged to about 480 pixels
    scale = max(1, round(480 / max(img.shape[:2])))
    if scale > 1:
        img = mmcv.imrescale(img, scale, interpolation='nearest')
        pred = result.pred_instances
        pred.bboxes = pred.bboxes * scale
        if 'masks' in pred and len(pred) > 0:
            pred.masks = torch.nn.functional.interpolate(
                pred.masks[None].float(), scale_factor=scale, mode='nearest')[0].bool()
    visualizer.add_datasample('prediction', img, data_sample=result, draw_gt=False, show=False,
                              pred_score_thr=args.score_thr, out_file=out_file)
    return out_file


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; return the exit status (0 on success)."""
    args = parse_args(argv)
    start = time.time()
    try:
        made = make_toy_coco(args.data_root)
        print(f'toy data {"written to" if made else "already complete in"} {args.data_root}',
              flush=True)
        train(args)
        checkpoint = last_checkpoint(args.work_dir)
        found = final_metrics(args.work_dir)
        picture = draw_prediction(args, checkpoint)
    except DemoError as e:
        print(f'demo failed: {e}', file=sys.stderr)
        return 1
    metrics = found['metrics']
    lines: List[str] = [
        '',
        'toy demo finished in {:.0f} s'.format(time.time() - start),
        f'  work dir   : {args.work_dir}',
        f'  checkpoint : {checkpoint}',
        f'  metrics    : {found["scalars"]}',
        f'  log        : {found["log"]}',
        f'  picture    : {picture}',
        '  bbox mAP   : {:.3f}  (AP50 {:.3f})'.format(metrics['coco/bbox_mAP'],
                                                     metrics['coco/bbox_mAP_50']),
        '  segm mAP   : {:.3f}  (AP50 {:.3f})'.format(metrics['coco/segm_mAP'],
                                                     metrics['coco/segm_mAP_50']),
    ]
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
