"""Generate a small synthetic COCO instance-segmentation set for the toy end-to-end demo.

    python tools/make_toy_coco.py [--out data/toy_coco] [--num-train 240] [--num-val 40]
        [--size 160] [--seed 0] [--force]

Three classes of flat shapes (``circle``, ``square``, ``triangle``), one to four per image,
with random sizes, rotations, colours and positions on a lightly textured background. Shapes
never overlap, so every instance's polygon *is* its visible mask: the annotation is exact and
a detector can reach a high mAP within minutes of CPU training from scratch.

Output (the layout ``configs/det/maskrcnn_hatnet_t_toy.py`` expects)::

    OUT/annotations/instances_train.json, instances_val.json
    OUT/train/000000.png ...   OUT/val/000000.png ...
    OUT/.toy_coco_done         marker: generator version + parameters

The output is byte-identical for the same parameters (one seeded ``numpy`` generator, PNG
without timestamps, JSON with fixed key order and rounded floats). When the marker matches
the requested parameters and the files exist, nothing is regenerated (``--force`` redoes it).
"""
import json
import math
import os
import os.path as osp
import shutil
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # run as a script or by runpy
from toy_data import (SIDES, Polygon, clear_marker, generator_params,  # noqa: E402
                      marker_matches, parse_toy_args, regular_polygon, write_marker)

#: bump when the images or annotations would change for the same parameters
GENERATOR_VERSION = 1
CLASSES = ('circle', 'square', 'triangle')
MARKER = '.toy_coco_done'
SPLITS = ('train', 'val')

def shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> Polygon:
    """Vertices of a ``kind`` inscribed in the circle ``(cx, cy, radius)``, rotated by ``angle``."""
    return regular_polygon(SIDES[kind], cx, cy, radius, angle)


def polygon_area(poly: Polygon) -> float:
    """Shoelace area of a simple polygon (COCO's ``area`` for an unoccluded instance)."""
    x = np.array([p[0] for p in poly])
    y = np.array([p[1] for p in poly])
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dim flat colour plus mild noise: texture the network must learn to ignore."""
    base = rng.integers(20, 90, size=3)
    noise = rng.normal(0, 6, size=(size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _make_image(rng: np.random.Generator, size: int, max_objects: int
                ) -> Tuple[np.ndarray, List[Dict]]:
    """One image and its instances (``category``, ``polygon``), shapes kept apart."""
    img = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(img)
    placed: List[Tuple[float, float, float]] = []
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        # rejection sampling for a free spot; a few failures just mean fewer objects
        for _attempt in range(20):
            radius = float(rng.uniform(0.09, 0.22) * size)
            cx, cy = (float(v) for v in rng.uniform(radius + 1, size - radius - 1, size=2))
            if all(math.hypot(cx - x, cy - y) > radius + r + 2 for x, y, r in placed):
                break
        else:
            continue
        kind = CLASSES[int(rng.integers(len(CLASSES)))]
        poly = shape_polygon(kind, cx, cy, radius, float(rng.uniform(0, 2 * math.pi)))
        # bright colours, so every shape stands out of the dim background
        colour = tuple(int(c) for c in rng.integers(120, 256, size=3))
        draw.polygon(poly, fill=colour)
        placed.append((cx, cy, radius))
        objects.append(dict(category=kind, polygon=poly))
    return np.asarray(img), objects


def _annotation(ann_id: int, image_id: int, obj: Dict, size: int) -> Dict:
    poly = [(min(max(x, 0.0), size), min(max(y, 0.0), size)) for x, y in obj['polygon']]
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    x0, y0 = min(xs), min(ys)
    return dict(
        id=ann_id, image_id=image_id, category_id=CLASSES.index(obj['category']) + 1,
        segmentation=[[round(v, 2) for p in poly for v in p]],
        area=round(polygon_area(poly), 2),
        bbox=[round(x0, 2), round(y0, 2), round(max(xs) - x0, 2), round(max(ys) - y0, 2)],
        iscrowd=0)


def is_complete(out: str, params: Dict) -> bool:
    """Whether ``out`` already holds a finished set generated with exactly ``params``."""
    if not marker_matches(out, MARKER, params):
        return False
    for split in SPLITS:
        n = params[f'num_{split}']
        if not osp.isfile(osp.join(out, 'annotations', f'instances_{split}.json')):
            return False
        if not osp.isfile(osp.join(out, split, f'{n - 1:06d}.png')):
            return False
    return True


def make_toy_coco(out: str = 'data/toy_coco', num_train: int = 240, num_val: int = 40,
                  size: int = 160, seed: int = 0, max_objects: int = 4,
                  force: bool = False) -> bool:
    """Write the toy set into ``out``; return False when an identical set was already there.

    Train and val come from separate generators (``seed`` and ``seed + 1``), so changing
    ``num_train`` does not change the validation images.
    """
    params = generator_params(GENERATOR_VERSION, num_train, num_val, size, seed, max_objects)
    if not force and is_complete(out, params):
        return False
    clear_marker(out, MARKER)  # written last: an interrupted run is never taken for complete
    os.makedirs(osp.join(out, 'annotations'), exist_ok=True)
    categories = [dict(id=i + 1, name=name, supercategory='shape')
                  for i, name in enumerate(CLASSES)]
    for split_idx, split in enumerate(SPLITS):
        rng = np.random.default_rng(seed + split_idx)
        folder = osp.join(out, split)
        shutil.rmtree(folder, ignore_errors=True)  # no stale images from a larger set
        os.makedirs(folder)
        images, annotations = [], []
        for image_id in range(params[f'num_{split}']):
            img, objects = _make_image(rng, size, max_objects)
            file_name = f'{image_id:06d}.png'
            Image.fromarray(img).save(osp.join(folder, file_name))
            images.append(dict(id=image_id, file_name=file_name, width=size, height=size))
            for obj in objects:
                annotations.append(_annotation(len(annotations) + 1, image_id, obj, size))
        coco = dict(info=dict(description='mmhat toy shapes', version=str(GENERATOR_VERSION)),
                    images=images, annotations=annotations, categories=categories)
        with open(osp.join(out, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(coco, f, separators=(',', ':'))
    write_marker(out, MARKER, params)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_toy_args(argv, __doc__, out='data/toy_coco', num_train=240, num_val=40,
                          size=160, max_objects=4)
    made = make_toy_coco(args.out, args.num_train, args.num_val, args.size, args.seed,
                         args.max_objects, args.force)
    print(f'{"wrote" if made else "up to date:"} toy COCO set in {args.out} '
          f'({args.num_train} train / {args.num_val} val images, {args.size}x{args.size})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
