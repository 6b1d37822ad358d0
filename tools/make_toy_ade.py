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
import math
import os
import os.path as osp
import shutil
import sys
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # run as a script or by runpy
from toy_data import (SIDES, clear_marker, generator_params,  # noqa: E402
                      marker_matches, parse_toy_args, regular_polygon, write_marker)

#: bump when the images or labels would change for the same parameters
GENERATOR_VERSION = 2
CLASSES = ('background', 'circle', 'square', 'triangle')
PALETTE = [(0, 0, 0), (220, 20, 60), (0, 130, 230), (20, 200, 60)]
#: the mean colour of each shape class (index 0, background, is drawn separately)
CLASS_COLOURS = [(0, 0, 0), (220, 60, 60), (60, 110, 230), (60, 210, 80)]
#: radius factor giving each shape the area of a circle of the drawn radius: inscribed in the
#: same circle a triangle covers 41% of it, and training from scratch ignored the rare class
AREA_SCALE = {kind: math.sqrt(math.pi / (0.5 * n * math.sin(2 * math.pi / n)))
              for kind, n in SIDES.items()}
MARKER = '.toy_ade_done'
SPLITS = ('train', 'val')



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
        poly = regular_polygon(SIDES[kind], cx, cy, radius * AREA_SCALE[kind],
                             float(rng.uniform(0, 2 * math.pi)))
        # the class's colour, jittered; bright, so every shape stands out of the background
        colour = np.clip(np.array(CLASS_COLOURS[class_id]) + rng.integers(-40, 41, size=3),
                         0, 255)
        draw_img.polygon(poly, fill=tuple(int(c) for c in colour))
        draw_label.polygon(poly, fill=class_id)  # later shapes cover earlier ones in both
    return np.asarray(img), np.asarray(label)


def is_complete(out: str, params: Dict) -> bool:
    """Whether ``out`` already holds a finished set generated with exactly ``params``."""
    if not marker_matches(out, MARKER, params):
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
    params = generator_params(GENERATOR_VERSION, num_train, num_val, size, seed, max_objects)
    if not force and is_complete(out, params):
        return False
    clear_marker(out, MARKER)  # written last: an interrupted run is never taken for complete
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
    write_marker(out, MARKER, params)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_toy_args(argv, __doc__, out='data/toy_ade', num_train=64, num_val=16,
                          size=128, max_objects=5)
    made = make_toy_ade(args.out, args.num_train, args.num_val, args.size, args.seed,
                        args.max_objects, args.force)
    print(f'{"wrote" if made else "up to date:"} toy segmentation set in {args.out} '
          f'({args.num_train} train / {args.num_val} val images, {args.size}x{args.size})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
