"""Parameters and FLOPs of mmhat backbones (mmengine's FlopAnalyzer).

    python tools/get_flops.py mmhat.HATNet --arch small [--shape 224 224]
    python tools/get_flops.py --all [--markdown]     # every variant of every family
    python tools/get_flops.py --config configs/det/maskrcnn_hatnet_s_coco.py [more configs]
        [--shape H W]      # whole detector / segmentor (default 800x1280 det, 512x512 seg)

What is counted: one fused multiply-add is one FLOP; convolutions, linear layers,
matmuls/einsums (the attention products) and norms are counted; softmax, activations,
element-wise adds and pooling are not. Attention runs on its explicit path while counting
(the fused kernel is one opaque op). Two totals are shown because papers differ: "total"
counts everything above; "conv+norm" leaves the attention matmuls out, which is what the
HAT-Net README's figures count.
"""
import argparse
import sys
import warnings

import torch

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

import mmhat  # noqa: E402,F401
from mmhat.models.layers import set_fused_attn  # noqa: E402
from mmhat.registry import MODELS  # noqa: E402

#: the ImageNet resolution of each family's official checkpoints
NATIVE_SIZE = {'TransCNN': 256}
MATMUL_OPS = ('matmul', 'bmm', 'einsum', 'baddbmm')


def measure(type_name: str, arch: str, shape=None) -> dict:
    """Params (M), total GFLOPs, conv+norm GFLOPs and attention-matmul GFLOPs."""
    from mmengine.analysis import FlopAnalyzer
    model = MODELS.build(dict(type=type_name, arch=arch)).eval()
    name = type_name.split('.')[-1]
    h, w = shape or (NATIVE_SIZE.get(name, 224), ) * 2
    set_fused_attn(False)
    try:
        with torch.no_grad():
            analyzer = FlopAnalyzer(model, torch.zeros(1, 3, h, w))
            analyzer.unsupported_ops_warnings(False)
            analyzer.uncalled_modules_warnings(False)
            by_op = analyzer.by_operator()
            total = analyzer.total()
    finally:
        set_fused_attn(True)
    matmul = sum(v for k, v in by_op.items() if k in MATMUL_OPS)
    return dict(model=f'{name}-{arch}', input=f'{h}x{w}',
                params=sum(p.numel() for p in model.parameters()) / 1e6,
                gflops=total / 1e9, conv_norm=(total - matmul) / 1e9, attn_matmul=matmul / 1e9)


def measure_config(path: str, shape=None) -> dict:
    """Params (M) and GFLOPs of a whole detector/segmentor at a fixed input size.

    The model's tensor forward (``_forward``: backbone, neck and heads, no post-processing
    beyond what the heads do, e.g. Mask R-CNN's RPN proposals feeding the RoI head) is
    traced with one image, as mmdet's and mmseg's own get_flops tools do.
    """
    from mmengine.analysis import FlopAnalyzer
    from mmengine.config import Config
    from mmengine.registry import DefaultScope, init_default_scope
    cfg = Config.fromfile(path)
    scope = cfg.get('default_scope', 'mmdet')
    init_default_scope(scope)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    cfg.model.backbone.init_cfg = None  # nothing to download: weights do not change FLOPs
    if 'norm_cfg' in cfg.model.backbone and cfg.model.backbone.norm_cfg.get('type') == 'SyncBN':
        cfg.model.backbone.norm_cfg.type = 'BN'
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(cfg.model).eval()
    h, w = shape or ((800, 1280) if scope == 'mmdet' else (512, 512))
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w),
                scale_factor=(1.0, 1.0))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        sample = DetDataSample(metainfo=meta)
    else:
        from mmseg.structures import SegDataSample
        sample = SegDataSample(metainfo=meta)

    class TensorForward(torch.nn.Module):

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model._forward(x, [sample])

    set_fused_attn(False)
    try:
        with torch.no_grad():
            analyzer = FlopAnalyzer(TensorForward(model), torch.zeros(1, 3, h, w))
            analyzer.unsupported_ops_warnings(False)
            analyzer.uncalled_modules_warnings(False)
            analyzer.tracer_warnings('none')
            total = analyzer.total()
            backbone = analyzer.by_module().get('model.backbone', 0)
    finally:
        set_fused_attn(True)
    name = path.rsplit('/', 1)[-1].rsplit('.', 1)[0]
    return dict(model=name, input=f'{h}x{w}',
                params=sum(p.numel() for p in model.parameters()) / 1e6,
                gflops=total / 1e9, backbone_gflops=backbone / 1e9)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('type', nargs='?', help='registered backbone, e.g. mmhat.HATNet')
    parser.add_argument('--arch', default=None, help='variant name (default: every variant)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input size (default: the family\'s ImageNet size)')
    parser.add_argument('--all', action='store_true', help='every variant of every family')
    parser.add_argument('--config', nargs='+', help='whole detector/segmentor config files')
    parser.add_argument('--markdown', action='store_true', help='print a markdown table')
    args = parser.parse_args(argv)
    if args.config:
        if args.markdown:
            print('| config | input | params (M) | GFLOPs | of which backbone |')
            print('|---|---|---|---|---|')
        for path in args.config:
            r = measure_config(path, args.shape)
            if args.markdown:
                print(f'| {r["model"]} | {r["input"]} | {r["params"]:.1f} | {r["gflops"]:.1f} | '
                      f'{r["backbone_gflops"]:.1f} |', flush=True)
            else:
                print(f'{r["model"]:40s} {r["input"]:>9s}  params {r["params"]:6.1f} M  GFLOPs '
                      f'{r["gflops"]:7.1f} (backbone {r["backbone_gflops"]:.1f})', flush=True)
        return 0
    if not args.all and not args.type:
        parser.error('give a backbone type (e.g. mmhat.HATNet), --all or --config')
    types = ([f'mmhat.{n}' for n in sorted(MODELS.module_dict)] if args.all else [args.type])
    rows = []
    for t in types:
        cls = MODELS.get(t)
        if cls is None:
            parser.error(f'unknown backbone {t!r}; registered: '
                         f'{", ".join("mmhat." + n for n in sorted(MODELS.module_dict))}')
        for arch in ([args.arch] if args.arch else list(cls.arch_zoo)):
            rows.append(measure(t, arch, args.shape))
            r = rows[-1]
            if not args.markdown:
                print(f'{r["model"]:24s} {r["input"]:>9s}  params {r["params"]:7.3f} M  '
                      f'GFLOPs {r["gflops"]:7.3f} (conv+norm {r["conv_norm"]:.3f}, attention '
                      f'matmul {r["attn_matmul"]:.3f})', flush=True)
    if args.markdown:
        print('| backbone | input | params (M) | GFLOPs total | conv+norm | attention matmul |')
        print('|---|---|---|---|---|---|')
        for r in rows:
            print(f'| {r["model"]} | {r["input"]} | {r["params"]:.3f} | {r["gflops"]:.3f} | '
                  f'{r["conv_norm"]:.3f} | {r["attn_matmul"]:.3f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
