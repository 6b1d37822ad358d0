"""Generate a small synthetic ImageNet-format classification set (mmpretrain's layout).

    python tools/make_toy_imagenet.py [--out data/toy_imagenet] [--num-train 48]
        [--num-val 12] [--size 96] [--seed 0] [--force]

One flat shape per image, ``circle`` (label 0), ``square`` (1) or ``triangle`` (2), of random
size, rotation, colour and position on a dim textured background: a classifier tells them
apart within a few CPU iterations. The labels are ImageNet class indices, so a 1000-class
classifier evaluates on it unchanged (its top-1 then says nothing about ImageNet: the set
checks the pipeline, the metric and fine-tuning, not accuracy).

Output (what ``configs/_base_/cls/imagenet_224.py`` reads with ``data_root=OUT``)::

    OUT/train/000000.png ...   OUT/val/000000.png ...
    OUT/meta/train.txt, OUT/meta/val.txt    "<file> <label>" per line, as ImageNet's
    OUT/.toy_imagenet_done                  marker: generator version + parameters

Byte-identical for the same parameters; skipped when the marker matches (``--force`` redoes it).
"""
import math
import os
import os.path as osp
import shutil
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # run as a script or by runpy
from toy_data import (SIDES, clear_marker, generator_params, marker_matches,  # noqa: E402
                      parse_toy_args, regular_polygon, write_marker)

#: bump when the images or labels would change for the same parameters
GENERATOR_VERSION = 1
CLASSES = ('circle', 'square', 'triangle')
MARKER = '.toy_imagenet_done'
SPLITS = ('train', 'val')


def _make_image(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, int]:
    """One image ``(size, size, 3)`` uint8 with one shape, and the shape's label."""
    base = rng.integers(20, 90, size=3)
    noise = rng.normal(0, 6, size=(size, size, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    label = int(rng.integers(len(CLASSES)))
    radius = float(rng.uniform(0.2, 0.4) * size)
    cx, cy = (float(v) for v in rng.uniform(radius + 1, size - radius - 1, size=2))
    poly = regular_polygon(SIDES[CLASSES[label]], cx, cy, radius, float(rng.uniform(0, 2 * math.pi)))
    colour = tuple(int(c) for c in rng.integers(120, 256, size=3))
    ImageDraw.Draw(img).polygon(poly, fill=colour)
    return np.asarray(img), label


def _split_lines(out: str, split: str) -> List[str]:
    path = osp.join(out, 'meta', f'{split}.txt')
    if not osp.isfile(path):
        return []
    with open(path) as f:
        return f.read().splitlines()


def is_complete(out: str, params: Dict) -> bool:
    """The marker records ``params`` and every listed image exists."""
    if not marker_matches(out, MARKER, params):
        return False
    for split, count in (('train', params['num_train']), ('val', params['num_val'])):
        lines = _split_lines(out, split)
        if len(lines) != count or not all(
                osp.isfile(osp.join(out, split, line.split()[0])) for line in lines):
            return False
    return True


def make_toy_imagenet(out: str = 'data/toy_imagenet', num_train: int = 48, num_val: int = 12,
                      size: int = 96, seed: int = 0, force: bool = False) -> bool:
    """Write the toy set into ``out``; return False when an identical set was already there."""
    if min(num_train, num_val) < 1 or size < 16:
        raise ValueError(f'need at least one image per split and size >= 16; got '
                         f'num_train={num_train}, num_val={num_val}, size={size}')
    params = generator_params(GENERATOR_VERSION, num_train, num_val, size, seed, 1)
    if not force and is_complete(out, params):
        return False
    os.makedirs(out, exist_ok=True)
    clear_marker(out, MARKER)
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(out, 'meta'), exist_ok=True)
    for split, count in (('train', num_train), ('val', num_val)):
        shutil.rmtree(osp.join(out, split), ignore_errors=True)
        os.makedirs(osp.join(out, split))
        lines = []
        for i in range(count):
            pixels, label = _make_image(rng, size)
            name = f'{i:06d}.png'
            Image.fromarray(pixels).save(osp.join(out, split, name), optimize=False)
            lines.append(f'{name} {label}')
        with open(osp.join(out, 'meta', f'{split}.txt'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    write_marker(out, MARKER, params)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_toy_args(argv, __doc__, 'data/toy_imagenet', 48, 12, 96, None)
    made = make_toy_imagenet(args.out, args.num_train, args.num_val, args.size, args.seed,
                             args.force)
    print(f'{"wrote" if made else "kept the complete"} toy ImageNet set in {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
