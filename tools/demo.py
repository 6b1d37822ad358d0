"""Predict on images with any mmhat config and checkpoint, and draw the result.

    python tools/demo.py CONFIG CHECKPOINT INPUT [--out-dir outputs/demo] [--score-thr 0.3]
        [--device cpu|cuda]

INPUT is an image or a folder of images. Detection configs (mmdet) are drawn with boxes
and masks, segmentation configs (mmseg) as a class overlay; one PNG per input goes to
``--out-dir`` under the input's name. The class names come from the checkpoint's metadata
(written by tools/train.py) or, failing that, from the config's dataset.
"""
import argparse
import os
import os.path as osp
import sys
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

from mmhat.engine import resumable_checkpoints  # noqa: E402

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def list_images(path: str) -> list:
    """The image files of ``path`` (a file or a folder, not recursive), sorted."""
    if osp.isfile(path):
        return [path]
    if osp.isdir(path):
        found = sorted(osp.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if found:
            return found
        raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {path}')
    raise FileNotFoundError(f'input not found: {path}')


def build(config: str, checkpoint: str, device: str):
    """(model, scope): an mmdet detector or an mmseg segmentor with its weights."""
    from mmengine.config import Config
    cfg = Config.fromfile(config)
    scope = cfg.get('default_scope', 'mmdet')
    # the backbone's ImageNet init is irrelevant: the checkpoint has every weight
    cfg.model.backbone.init_cfg = None
    # mmengine's training checkpoints hold types torch >= 2.6 only loads when allow-listed
    with resumable_checkpoints():
        if scope == 'mmseg':
            from mmseg.apis import init_model
            cfg.model.pretrained = None
            return init_model(cfg, checkpoint, device=device), scope
        from mmdet.apis import init_detector
        return init_detector(cfg, checkpoint, device=device), scope


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('input', help='an image or a folder of images')
    parser.add_argument('--out-dir', default='outputs/demo')
    parser.add_argument('--score-thr', type=float, default=0.3, help='detection score to draw')
    parser.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    args = parser.parse_args(argv)
    try:
        images = list_images(args.input)
        for path in (args.config, args.checkpoint):
            if '://' not in path and not osp.isfile(path):
                raise FileNotFoundError(f'not found: {path}')
    except FileNotFoundError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2

    import mmcv
    import torch
    from mmengine.utils import ProgressBar
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model, scope = build(args.config, args.checkpoint, device)
    if scope == 'mmseg':
        from mmseg.apis import inference_model as infer
        from mmseg.registry import VISUALIZERS
        visualizer = VISUALIZERS.build(dict(type='SegLocalVisualizer', name='mmhat_demo',
                                            alpha=0.5))
    else:
        from mmdet.apis import inference_detector as infer
        from mmdet.registry import VISUALIZERS
        visualizer = VISUALIZERS.build(dict(type='DetLocalVisualizer', name='mmhat_demo'))
    visualizer.dataset_meta = model.dataset_meta
    os.makedirs(args.out_dir, exist_ok=True)
    progress = ProgressBar(len(images), file=sys.stdout)  # the current stdout, not import-time
    written = []
    for path in images:
        result = infer(model, path)
        out_file = osp.join(args.out_dir, osp.splitext(osp.basename(path))[0] + '.png')
        kwargs = dict(pred_score_thr=args.score_thr) if scope == 'mmdet' else {}
        visualizer.add_datasample('prediction', mmcv.imread(path, channel_order='rgb'),
                                  data_sample=result, draw_gt=False, show=False,
                                  out_file=out_file, **kwargs)
        written.append(out_file)
        progress.update()
    print(f'\n{len(written)} picture(s) in {args.out_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
