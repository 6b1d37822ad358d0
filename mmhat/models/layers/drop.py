"""Stochastic depth."""
from mmcv.cnn.bricks import DropPath
from torch import nn


def drop_path(rate: float) -> nn.Module:
    """``DropPath(rate)`` on a residual branch, or ``Identity`` when ``rate`` is 0 (the
    official models build no module there, so state dicts and outputs are unchanged)."""
    return DropPath(rate) if rate > 0 else nn.Identity()
