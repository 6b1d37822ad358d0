"""Layout helpers: NCHW <-> tokens, padding to a multiple, windows.

Every family works on maps of arbitrary size; these helpers name the pads and crops so
that no backbone writes ``x[..., :-0]`` by hand.
"""
from typing import Tuple

import torch
import torch.nn.functional as F


def nchw_to_nlc(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)``, tokens in row-major order."""
    return x.flatten(2).transpose(1, 2)  # (B, H*W, C)


def nlc_to_nchw(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """``(B, H*W, C)`` -> ``(B, C, H, W)``."""
    B, N, C = x.shape
    H, W = hw
    if N != H * W:
        raise ValueError(f'{N} tokens cannot form a {H}x{W} map')
    return x.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


def pad_amounts(hw: Tuple[int, int], multiple: int) -> Tuple[int, int]:
    """Rows and columns to add at the bottom/right so both sides divide ``multiple``."""
    H, W = hw
    return (-H) % multiple, (-W) % multiple


def pad_bottom_right(x: torch.Tensor, pad_h: int, pad_w: int,
                     value: float = 0.) -> torch.Tensor:
    """Pad the last two dims of ``x`` at the bottom/right with ``value`` (no-op when 0, 0)."""
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), value=value)


def ceil_pool2d(x: torch.Tensor, window: int, mode: str) -> torch.Tensor:
    """``F.max_pool2d`` / ``F.avg_pool2d`` with stride ``window`` and ``ceil_mode=True``:
    ``(B, C, H, W)`` -> ``(B, C, ceil(H/window), ceil(W/window))``; border windows cover
    what is left, and an average divides by their valid pixels only.

    While exporting to ONNX the same values come from a map padded to whole windows (-inf
    for the max; for the average, the zero-padded sum over the count of valid pixels):
    torch 2.1's TorchScript exporter cannot size a ceil-mode pool whose input size it only
    knows at run time (``get_pool_ceil_padding, input size not accessible``).
    """
    if mode not in ('max', 'avg'):
        raise ValueError(f"mode must be 'max' or 'avg', not {mode!r}")
    if not torch.onnx.is_in_onnx_export():
        pool = F.max_pool2d if mode == 'max' else F.avg_pool2d
        return pool(x, window, window, ceil_mode=True)
    pads = pad_amounts(x.shape[-2:], window)
    if mode == 'max':
        return F.max_pool2d(pad_bottom_right(x, *pads, value=float('-inf')), window, window)
    ones = torch.ones_like(x[:1, :1])  # (1, 1, H, W)
    return (F.avg_pool2d(pad_bottom_right(x, *pads), window, window)
            / F.avg_pool2d(pad_bottom_right(ones, *pads), window, window))


def crop(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """Keep the top-left ``H x W`` of the last two dims (no copy when nothing is cut)."""
    H, W = hw
    if x.shape[-2] == H and x.shape[-1] == W:
        return x
    return x[..., :H, :W]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """Cut a map into non-overlapping ``window x window`` cells.

    Args:
        x: ``(B, C, H, W)`` with ``H`` and ``W`` multiples of ``window``.

    Returns:
        ``(B, nH, nW, window*window, C)``; cells in row-major order, tokens of a cell in
        row-major ``(gy, gx)`` order.
    """
    B, C, H, W = x.shape
    nH, nW = H // window, W // window
    x = x.view(B, C, nH, window, nW, window)  # (B, C, nH, gy, nW, gx)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, nH, nW, gy, gx, C)
    return x.reshape(B, nH, nW, window * window, C)  # (B, nH, nW, G*G, C)


def window_reverse(cells: torch.Tensor, window: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B, nH, nW, G*G, C)`` -> ``(B, C, nH*G, nW*G)``."""
    B, nH, nW, _, C = cells.shape
    x = cells.view(B, nH, nW, window, window, C)  # (B, nH, nW, gy, gx, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, nH, gy, nW, gx)
    return x.reshape(B, C, nH * window, nW * window)  # (B, C, H, W)


def head_dims(embed_dims: int, num_heads: int) -> int:
    """The width of each of ``num_heads`` heads over ``embed_dims`` channels; a clear error
    when they do not divide."""
    if embed_dims % num_heads:
        raise ValueError(f'embed_dims {embed_dims} is not divisible by num_heads {num_heads}')
    return embed_dims // num_heads


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Tokens to heads: ``(B, N, h*d)`` (channel ``head * d + j``) -> ``(B, h, N, d)``."""
    B, N, C = x.shape
    return x.view(B, N, num_heads, C // num_heads).transpose(1, 2)  # (B, h, N, d)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """Heads to tokens, the inverse of :func:`split_heads`: ``(B, h, N, d)`` -> ``(B, N, h*d)``."""
    B, h, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, h * d)  # (B, N, C)


def split_heads_nchw(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A map to heads: ``(B, h*d, H, W)`` (channel ``head * d + j``) -> ``(B, h, H*W, d)``."""
    B, C, H, W = x.shape
    x = x.reshape(B, num_heads, C // num_heads, H * W)  # (B, h, d, N)
    return x.transpose(-2, -1)  # (B, h, N, d)


def merge_heads_nchw(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """Heads to a map, the inverse of :func:`split_heads_nchw`: ``(B, h, H*W, d)`` ->
    ``(B, h*d, H, W)``."""
    B, h, N, d = x.shape
    return x.transpose(-2, -1).reshape(B, h * d, *hw)  # (B, C, H, W)
