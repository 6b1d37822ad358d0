"""Convert an official classification checkpoint to mmhat's backbone format, with a report.

    python tools/convert_checkpoint.py mmhat.HATNet --arch small HAT-Net_Small.pth hatnet_s.pth

The output holds ``{'state_dict': backbone weights, 'meta': {...}}`` and loads with
``init_cfg=dict(type='Pretrained', checkpoint='hatnet_s.pth')``. The conversion is checked by
loading the result strictly into the backbone, so a wrong ``--arch`` or family fails here.
Backbones also load official files directly; converting is for sharing a smaller file or
inspecting what was dropped.
"""
import argparse
import sys
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

import torch  # noqa: E402

import mmhat.models  # noqa: E402,F401  registers the backbones
from mmhat.checkpoint import (CheckpointError, extract_state_dict,  # noqa: E402
                              load_checkpoint_file, load_state_dict_strict)
from mmhat.registry import MODELS  # noqa: E402


def convert(type_name: str, arch: str, src: str, dst: str) -> dict:
    """Convert ``src`` to ``dst``; returns a report (counts, dropped keys with reasons)."""
    cls = MODELS.get(type_name)
    if cls is None:
        raise ValueError(f'unknown backbone {type_name!r}; registered: '
                         f'{", ".join("mmhat." + n for n in sorted(MODELS.module_dict))}')
    model = MODELS.build(dict(type=type_name, arch=arch))
    conversion = cls.convert_checkpoint(extract_state_dict(load_checkpoint_file(src)))
    load_state_dict_strict(model, conversion.state_dict, source=src,
                           hint=f'Is {src} a {type_name} arch={arch!r} checkpoint?')
    torch.save({'state_dict': conversion.state_dict,
                'meta': dict(mmhat_type=type_name, arch=arch, converted_from=src)}, dst)
    return dict(kept=len(conversion.state_dict), converted=conversion.converted,
                dropped=conversion.dropped)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('type', help='backbone type, e.g. mmhat.HATNet')
    parser.add_argument('--arch', required=True, help='variant, e.g. small')
    parser.add_argument('src', help='official checkpoint (path or URL)')
    parser.add_argument('dst', help='output file')
    args = parser.parse_args(argv)
    try:
        report = convert(args.type, args.arch, args.src, args.dst)
    except (CheckpointError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    state = 'official keys converted' if report['converted'] else 'already in mmhat format'
    print(f'{args.dst}: {report["kept"]} tensors ({state}), verified by a strict load')
    reasons = {}
    for key, why in report['dropped'].items():
        reasons.setdefault(why, []).append(key)
    for why, keys in reasons.items():
        print(f'  dropped {len(keys)} ({why}): {", ".join(keys[:6])}'
              f'{", ..." if len(keys) > 6 else ""}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
