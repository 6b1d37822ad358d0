"""Properties every backbone keeps at any input size, batch size and ``out_indices``,
checked with hypothesis for every family's smallest variant (random init, seed 0, eval).

* Shapes: stage ``i`` has ``out_channels`` channels and the documented size (ceil(H / 4),
  then halving with ceil, for every family) and the family's ``stage_size`` says the same;
  values are finite.
* ``out_indices`` only selects: a model built with a subset returns, bit for bit, those
  stages of the model with all four (same weights).
* No cross-sample leakage: a batch of different images gives each image's outputs alone
  (up to float rounding of batched kernels, bound 1e-5 of the stage's max).

Examples are derandomised (the same on every run and in CI) and kept small: sides 32-200,
batches of 1-3, about 20 s for the file on one idle thread.
"""
import math
from functools import lru_cache
from typing import Tuple

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import backbone_contract as contract
from mmhat.registry import MODELS

FAMILIES = contract.family_ids()
ALL_STAGES = (0, 1, 2, 3)


def halving(h1: int, i: int) -> int:
    """``H_{i+1} = ceil(H_i / 2)`` applied ``i`` times from ``H_1``."""
    for _ in range(i):
        h1 = math.ceil(h1 / 2)
    return h1


def stage_size(side: int, i: int) -> int:
    """The documented contract of every family: the conv chain's ``ceil(H / 4)``, then
    halving with ceil (written here on its own, not read from the code)."""
    return halving(math.ceil(side / 4), i)


PROPERTY_SETTINGS = settings(derandomize=True, database=None, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])
sides = st.integers(min_value=32, max_value=200)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
stage_subsets = st.lists(st.sampled_from(ALL_STAGES), min_size=1, max_size=4,
                         unique=True).map(lambda s: tuple(sorted(s)))


@lru_cache(maxsize=None)
def build(family: str, out_indices: Tuple[int, ...] = ALL_STAGES) -> torch.nn.Module:
    """Built once per (family, out_indices); every subset shares the seed-0 weights."""
    torch.manual_seed(0)
    model = MODELS.build(dict(type=f'mmhat.{family}', arch=MODELS.get(family).smallest_arch,
                              out_indices=out_indices))
    model.init_weights()
    if out_indices != ALL_STAGES:
        model.load_state_dict(build(family).state_dict(), strict=True)
    return model.eval()


def images(batch: int, h: int, w: int, seed: int) -> torch.Tensor:
    """``batch`` different images: each has its own scale and offset as well as its noise,
    so that mixing between samples cannot cancel out."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, h, w, generator=g)
    scale = torch.tensor([1.0, 3.0, 0.3])[:batch].view(batch, 1, 1, 1)
    offset = torch.tensor([0.0, 1.5, -0.7])[:batch].view(batch, 1, 1, 1)
    return x * scale + offset


@pytest.mark.parametrize('family', FAMILIES)
@settings(PROPERTY_SETTINGS, max_examples=10)
@given(h=sides, w=sides, batch=st.integers(1, 3), out_indices=stage_subsets, seed=seeds)
@example(h=32, w=33, batch=1, out_indices=ALL_STAGES, seed=0)  # the smallest, odd width
@example(h=200, w=97, batch=3, out_indices=(3, ), seed=1)
def test_shapes_finite_and_out_indices_select(family, h, w, batch, out_indices, seed):
    model, full = build(family, out_indices), build(family)
    x = images(batch, h, w, seed)
    with torch.no_grad():
        outs, all_outs = model(x), full(x)
    assert len(outs) == len(out_indices)
    assert model.out_channels == [full.out_channels[i] for i in out_indices]
    for out, i, channels in zip(outs, out_indices, model.out_channels):
        expected = (batch, channels, stage_size(h, i), stage_size(w, i))
        assert (MODELS.get(family).stage_size(h, i), MODELS.get(family).stage_size(w, i)) == \
            expected[2:], 'the declared stage_size disagrees with the contract'

        assert tuple(out.shape) == expected, f'stage {i} at {h}x{w}'
        assert torch.isfinite(out).all(), f'stage {i} at {h}x{w}: non-finite values'
        assert torch.equal(out, all_outs[i]), f'stage {i}: out_indices changed the values'


@pytest.mark.parametrize('family', FAMILIES)
@settings(PROPERTY_SETTINGS, max_examples=8)
@given(h=sides, w=sides, batch=st.integers(2, 3), seed=seeds)
@example(h=33, w=47, batch=2, seed=0)
def test_batch_equals_images_alone(family, h, w, batch, seed):
    model = build(family)
    x = images(batch, h, w, seed)
    with torch.no_grad():
        batched = model(x)
        alone = [model(x[b:b + 1]) for b in range(batch)]
    for i, stage in enumerate(batched):
        for b in range(batch):
            ref = alone[b][i][0]
            err, bound = (stage[b] - ref).abs().max().item(), 1e-5 * ref.abs().max().item()
            assert err <= bound, f'stage {i}, image {b} of {batch} at {h}x{w}: ' \
                                 f'max|batched - alone| {err:.2e} > {bound:.2e}'
