"""Generate a small synthetic semantic-segmentation set for the toy Semantic FPN.

    python tools/make_toy_ade.py [--out data/toy_ade] [--num-train 64] [--num-val 16]
        [--size 128] [--seed 0] [--force]

Four classes: ``background`` (0) and three kinds of flat shapes, ``circle`` (1), ``square``
(2) and ``triangle`` (3), one to five per image with random sizes, rotations, colours and
positions on a lightly textured background. Shapes may overlap; the label map is painted with
the same polygons in the same order as the image, by the same rasteriser, so every pixel's
label is exactly the class of what is visible there. Each class has its own hue (jittered per
shape) besides its shape: with shape alone, HAT-Net-T trained from scratch reached only 0.48
mIoU after 256 iterations, too slow for a toy whose job is to show that training works.

Output (mmseg's ``BaseSegDataset`` layout, what ``configs/seg/fpn_hatnet_t_toy.py`` expects)::

    OUT/img_dir/{train,val}/000000.png ...   RGB images
    OUT/ann_dir/{train,val}/000000.png ...   uint8 class index per pixel
    OUT/.toy_ade_done                        marker: generator version + parameters

The output is byte-identical for the same parameters (one seeded ``numpy`` generator per
split, PNG without timestamps). When the marker matches the requested parameters and the files
exist, nothing is regenerated (``--force`` redoes it).
"""
import argparse
import json
import math
import os
import os.path as osp
import shutil
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

#: bump when the images or labels would change for the same parameters
GENERATOR_VERSION = 2
CLASSES = ('background', 'circle', 'square', 'triangle')
PALETTE = [(0, 0, 0), (220, 20, 60), (0, 130, 230), (20, 200, 60)]
#: the mean colour of each shape class (index 0, background, is drawn separately)
CLASS_COLOURS = [(0, 0, 0), (220, 60, 60), (60, 110, 230), (60, 210, 80)]
SIDES = {'circle': 32, 'square': 4, 'triangle': 3}  # a 32-gon is a circle at these sizes
#: radius factor giving each shape the area of a circle of the drawn radius: inscribed in the
#: same circle a triangle covers 41% of it, and training from scratch ignored the rare class
AREA_SCALE = {kind: math.sqrt(math.pi / (0.5 * n * math.sin(2 * math.pi / n)))
              for kind, n in SIDES.items()}
MARKER = '.toy_ade_done'
SPLITS = ('train', 'val')

Polygon = List[Tuple[float, float]]


def shape_polygon(sides: int, cx: float, cy: float, radius: float, angle: float) -> Polygon:
    """Vertices of a regular ``sides``-gon inscribed in the circle ``(cx, cy, radius)``."""
    return [(cx + radius * math.cos(angle + 2 * math.pi * k / sides),
             cy + radius * math.sin(angle + 2 * math.pi * k / sides)) for k in range(sides)]


def make_sample(rng: np.random.Generator, size: int, max_objects: int
                ) -> Tuple[np.ndarray, np.ndarray]:
    """One image ``(size, size, 3)`` uint8 and its label map ``(size, size)`` uint8."""
    # a dim flat colour plus mild noise: texture the network must learn to ignore
    base = rng.integers(20, 90, size=3)
    noise = rng.normal(0, 6, size=(size, size, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    label = Image.new('L', (size, size), 0)
    draw_img, draw_label = ImageDraw.Draw(img), ImageDraw.Draw(label)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        class_id = int(rng.integers(1, len(CLASSES)))
        radius = float(rng.uniform(0.08, 0.20) * size)
        cx, cy = (float(v) for v in rng.uniform(radius, size - radius, size=2))
        kind = CLASSES[class_id]
        poly = shape_polygon(SIDES[kind], cx, cy, radius * AREA_SCALE[kind],
                             float(rng.uniform(0, 2 * math.pi)))
        # the class's colour, jittered; bright, so every shape stands out of the background
        colour = np.clip(np.array(CLASS_COLOURS[class_id]) + rng.integers(-40, 41, size=3),
                         0, 255)
        draw_img.polygon(poly, fill=tuple(int(c) for c in colour))
        draw_label.polygon(poly, fill=class_id)  # later shapes cover earlier ones in both
    return np.asarray(img), np.asarray(label)


def _params(num_train: int, num_val: int, size: int, seed: int, max_objects: int) -> Dict:
    return dict(version=GENERATOR_VERSION, num_train=num_train, num_val=num_val, size=size,
                seed=seed, max_objects=max_objects)


def is_complete(out: str, params: Dict) -> bool:
    """Whether ``out`` already holds a finished set generated with exactly ``params``."""
    try:
        with open(osp.join(out, MARKER)) as f:
            if json.load(f) != params:
                return False
    except (OSError, ValueError):
        return False
    last = f'{params["num_train"] - 1:06d}.png'
    return all(osp.isfile(osp.join(out, folder, 'train', last))
               for folder in ('img_dir', 'ann_dir'))


def make_toy_ade(out: str = 'data/toy_ade', num_train: int = 64, num_val: int = 16,
                 size: int = 128, seed: int = 0, max_objects: int = 5,
                 force: bool = False) -> bool:
    """Write the toy set into ``out``; return False when an identical set was already there.

    Train and val come from separate generators (``seed`` and ``seed + 1``), so changing
    ``num_train`` does not change the validation images.
    """
    params = _params(num_train, num_val, size, seed, max_objects)
    if not force and is_complete(out, params):
        return False
    # drop the marker first, write it last: an interrupted run is never taken for complete
    if osp.exists(osp.join(out, MARKER)):
        os.remove(osp.join(out, MARKER))
    for split_idx, split in enumerate(SPLITS):
        rng = np.random.default_rng(seed + split_idx)
        img_dir, ann_dir = osp.join(out, 'img_dir', split), osp.join(out, 'ann_dir', split)
        for folder in (img_dir, ann_dir):
            shutil.rmtree(folder, ignore_errors=True)  # no stale files from a larger set
            os.makedirs(folder)
        for index in range(params[f'num_{split}']):
            img, label = make_sample(rng, size, max_objects)
            Image.fromarray(img).save(osp.join(img_dir, f'{index:06d}.png'))
            Image.fromarray(label).save(osp.join(ann_dir, f'{index:06d}.png'))
    with open(osp.join(out, MARKER), 'w') as f:
        json.dump(params, f)
    return True


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='data/toy_ade', help='output folder')
    parser.add_argument('--num-train', type=int, default=64, help='training images')
    parser.add_argument('--num-val', type=int, default=16, help='validation images')
    parser.add_argument('--size', type=int, default=128, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument('--max-objects', type=int, default=5, help='shapes per image, at most')
    parser.add_argument('--force', action='store_true', help='regenerate even if complete')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_args(argv)
    made = make_toy_ade(args.out, args.num_train, args.num_val, args.size, args.seed,
                        args.max_objects, args.force)
    print(f'{"wrote" if made else "up to date:"} toy segmentation set in {args.out} '
          f'({args.num_train} train / {args.num_val} val images, {args.size}x{args.size})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
