"""What the toy data generators share: shapes, the completion marker and the command line.

``make_toy_coco.py`` (instance segmentation) and ``make_toy_ade.py`` (semantic
segmentation) draw the same kind of shapes and skip regeneration the same way: a marker
file holding the generator parameters is removed first and written last, so an
interrupted run is never taken for a complete set.
"""
import argparse
import json
import math
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

Polygon = List[Tuple[float, float]]
#: vertices per shape; a 32-gon is a circle at these sizes (drawn disc and polygon agree
#: to a pixel)
SIDES = {'circle': 32, 'square': 4, 'triangle': 3}


def regular_polygon(sides: int, cx: float, cy: float, radius: float, angle: float) -> Polygon:
    """Vertices of a regular ``sides``-gon inscribed in the circle ``(cx, cy, radius)``,
    rotated by ``angle``."""
    return [(cx + radius * math.cos(angle + 2 * math.pi * k / sides),
             cy + radius * math.sin(angle + 2 * math.pi * k / sides)) for k in range(sides)]


def generator_params(version: int, num_train: int, num_val: int, size: int, seed: int,
                     max_objects: int) -> Dict:
    """What identifies a generated set (written into the marker)."""
    return dict(version=version, num_train=num_train, num_val=num_val, size=size, seed=seed,
                max_objects=max_objects)


def marker_matches(out: str, marker: str, params: Dict) -> bool:
    """Whether ``out/marker`` records exactly ``params``."""
    try:
        with open(osp.join(out, marker)) as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False


def clear_marker(out: str, marker: str) -> None:
    """Remove the marker before writing anything."""
    if osp.exists(osp.join(out, marker)):
        os.remove(osp.join(out, marker))


def write_marker(out: str, marker: str, params: Dict) -> None:
    """Write the marker once everything else is written."""
    with open(osp.join(out, marker), 'w') as f:
        json.dump(params, f)


def parse_toy_args(argv: Optional[Sequence[str]], doc: str, out: str, num_train: int,
                   num_val: int, size: int, max_objects: Optional[int]) -> argparse.Namespace:
    """The generators' common command line, with each generator's defaults."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=out, help='output folder')
    parser.add_argument('--num-train', type=int, default=num_train, help='training images')
    parser.add_argument('--num-val', type=int, default=num_val, help='validation images')
    parser.add_argument('--size', type=int, default=size, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    if max_objects is not None:  # None: one shape per image (the classification set)
        parser.add_argument('--max-objects', type=int, default=max_objects,
                            help='shapes per image, at most')
    parser.add_argument('--force', action='store_true', help='regenerate even if complete')
    return parser.parse_args(argv)
