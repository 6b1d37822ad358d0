"""Parameters and FLOPs of mmhat backbones and whole models (see :mod:`mmhat.utils.flops`
for what is counted).

    python tools/get_flops.py mmhat.HATNet --arch small [--shape 224 224]
    python tools/get_flops.py --all [--markdown]     # every variant of every family
    python tools/get_flops.py --config configs/det/maskrcnn_hatnet_s_coco.py [more configs]
        [--shape H W]      # whole detector / segmentor (default 800x1280 det, 512x512 seg)
"""
import argparse
import sys
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

import mmhat.models  # noqa: E402,F401  registers the families
from mmhat.registry import MODELS  # noqa: E402
from mmhat.utils.flops import backbone_flops, config_flops  # noqa: E402


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
            r = config_flops(path, args.shape)
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
            rows.append(backbone_flops(t, arch, args.shape))
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
