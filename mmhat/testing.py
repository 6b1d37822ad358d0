"""The official models as numbers: stand-in checkpoints and reference cases.

Used by the test suite and by ``tools/gpu_check.py`` (both run from a checkout: the data
lives in the repository's ``tests/data/reference/``, which an installed wheel does not ship;
``MMHAT_REFERENCE_DATA`` points elsewhere).

``tests/data/reference/`` holds, per official variant, a manifest of the official
state_dict (key -> shape, parameter counts) and, per family, a case: an input, BatchNorm
statistics and the four stage outputs that the official model computes from a
deterministic stand-in checkpoint. This module rebuilds that checkpoint from the rule
below (a function of key name and shape only, the same on every machine), so the tests
prove equality with the official code without it and without a download.

The rule, for a key ``k`` of shape ``s`` with ``n`` elements:
``phase = (crc32(k) mod 100003) / 100003 * 2 pi``; ``u_i = frac(sin(12.9898 i + phase) *
43758.5453)`` in float64, cast to float32; integers are zeros; ``running_mean`` is
``0.2 (u - 0.5)``, ``running_var`` ``0.5 + u``, ``bias`` ``0.2 (u - 0.5)``, other 1-D
tensors ``0.8 + 0.4 u``, everything else ``sqrt(3 / fan_in) (2u - 1)``.
"""
import json
import math
import os
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Dict

import torch

DATA = Path(os.environ.get('MMHAT_REFERENCE_DATA') or
            Path(__file__).resolve().parents[1] / 'tests' / 'data' / 'reference')


def _data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f'reference data not found: {path}. It lives in the mmhat repository '
            f'(tests/data/reference/); run from a checkout, or set MMHAT_REFERENCE_DATA to '
            f'that folder.')
    return path


def stand_in_tensor(key: str, shape, dtype: str = 'float32') -> torch.Tensor:
    """The stand-in value of official key ``key`` (the rule in the module docstring)."""
    shape = tuple(shape)
    n = math.prod(shape)
    if dtype.startswith('int'):
        return torch.zeros(shape, dtype=torch.int64)
    phase = (zlib.crc32(key.encode('utf-8')) % 100003) / 100003.0 * 2 * math.pi
    v = torch.sin(torch.arange(n, dtype=torch.float64) * 12.9898 + phase) * 43758.5453
    u = (v - torch.floor(v)).to(torch.float32).reshape(shape)
    name = key.rsplit('.', 1)[-1]
    if name in ('running_mean', 'bias'):
        return 0.2 * (u - 0.5)
    if name == 'running_var':
        return 0.5 + u
    if len(shape) == 1:
        return 0.8 + 0.4 * u
    fan_in = max(math.prod(shape[1:]), 1)
    return math.sqrt(3.0 / fan_in) * (2.0 * u - 1.0)


@lru_cache(maxsize=None)
def manifest(name: str) -> dict:
    """``name`` like ``'hatnet-tiny'``."""
    return json.loads(_data('manifests', f'{name}.json').read_text())


def official_state_dict(name: str) -> Dict[str, torch.Tensor]:
    """The stand-in official checkpoint of a variant (classifier included)."""
    return {k: stand_in_tensor(k, v['shape'], v.get('dtype', 'float32'))
            for k, v in manifest(name)['state_dict'].items()}


def case_path(name: str) -> Path:
    matches = sorted(_data('cases').glob(f'{name}_b*.pt'))
    if not matches:
        raise FileNotFoundError(f'no reference case for {name} in {DATA / "cases"}')
    return matches[0]


def load_case(name: str) -> dict:
    """The case of ``name`` (``'hatnet-tiny'``); ``dtype`` tells the outputs' precision."""
    from mmhat.checkpoint import safe_torch_load
    return safe_torch_load(case_path(name))


def write_official_checkpoint(name: str, path: Path, with_case_overrides: bool = True) -> Path:
    """Save ``{'model': state_dict}`` as the authors publish it; returns ``path``."""
    sd = official_state_dict(name)
    if with_case_overrides:
        sd.update(load_case(name)['overrides'])
    torch.save({'model': sd}, path)
    return path


#: the bar in float64: rounding is ~1e-14 there, so any real difference stands out
FLOAT64_REL = 1e-7


def float32_bars(name: str) -> list:
    """Per stage, the float32 bar of case ``name``: 3x the official model's own float32 vs
    float64 gap (``data/reference/float32_gaps.json``)."""
    gaps = json.loads(_data('float32_gaps.json').read_text())[name]
    return [3 * g for g in gaps]


def relative_errors(outputs, reference) -> list:
    """``max|ours - ref| / max|ref|`` per stage (in float64)."""
    assert len(outputs) == len(reference)
    errs = []
    for i, (ours, ref) in enumerate(zip(outputs, reference)):
        assert ours.shape == ref.shape, f'stage {i}: shape {tuple(ours.shape)} != {tuple(ref.shape)}'
        errs.append(((ours.double() - ref.double()).abs().max() / ref.abs().max()).item())
    return errs


def assert_matches_reference(outputs, reference, rel=1e-4) -> None:
    """The bar: ``max|ours - ref| <= rel * max|ref|`` for every stage (``rel`` one number or
    one per stage)."""
    rels = list(rel) if isinstance(rel, (list, tuple)) else [rel] * len(reference)
    for i, (err, bound) in enumerate(zip(relative_errors(outputs, reference), rels)):
        assert err <= bound, f'stage {i}: max|diff| / max|ref| {err:.3e} > {bound:.1e}'
