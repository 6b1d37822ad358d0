"""Parameters and FLOPs of mmhat backbones (mmengine's FlopAnalyzer).

    python tools/get_flops.py mmhat.HATNet --arch small [--shape 224 224]
    python tools/get_flops.py --all [--markdown]     # every variant of every family

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('type', nargs='?', help='registered backbone, e.g. mmhat.HATNet')
    parser.add_argument('--arch', default=None, help='variant name (default: every variant)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input size (default: the family\'s ImageNet size)')
    parser.add_argument('--all', action='store_true', help='every variant of every family')
    parser.add_argument('--markdown', action='store_true', help='print a markdown table')
    args = parser.parse_args(argv)
    if not args.all and not args.type:
        parser.error('give a backbone type (e.g. mmhat.HATNet) or --all')
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
