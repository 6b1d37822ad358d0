"""Layout helpers: NCHW <-> tokens, padding to a multiple, windows.

Every family works on maps of arbitrary size; these helpers name the pads and crops so
that no backbone writes ``x[..., :-0]`` by hand.
"""
import math
from typing import Iterator, List, Tuple

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



# ---------------------------------------------------------------------------------------
# Windows in one copy each way
# ---------------------------------------------------------------------------------------
# With the pad before and the crop after, ``window_partition`` / ``window_reverse`` make a
# window attention's forward copy its q/k/v map twice (pad, cut) and its output twice
# (merge, crop-and-add), and autograd's backward of the q/k/v split stacks the three
# gradients and copies them twice more. ``window_qkv`` / ``merge_windows`` copy once each
# way: the map's valid region, seen as up to four boxes of whole and partial cells, is
# copied into (or out of) the cells, and the cells' padded positions are zeros.


def _cell_spans(n: int, window: int) -> List[Tuple[int, int, int, int]]:
    """The valid extent ``n`` of one side as spans of whole cells, then the partial cell:
    ``(start, stop, first cell, pixels per cell)``."""
    full, rest = divmod(n, window)
    spans = [(0, full * window, 0, window)] if full else []
    return spans + ([(full * window, n, full, rest)] if rest else [])


def _cell_boxes(hw: Tuple[int, int], window: int) -> Iterator[Tuple[slice, ...]]:
    """The valid region of an ``H x W`` map as up to four boxes, each ``(map rows, map
    cols, cell rows, cell cols, pixel rows in a cell, pixel cols in a cell)``."""
    for r0, r1, cr, gr in _cell_spans(hw[0], window):
        for c0, c1, cc, gc in _cell_spans(hw[1], window):
            yield (slice(r0, r1), slice(c0, c1), slice(cr, cr + (r1 - r0) // gr),
                   slice(cc, cc + (c1 - c0) // gc), slice(0, gr), slice(0, gc))


def _map_box(nhwc: torch.Tensor, box: Tuple[slice, ...]) -> torch.Tensor:
    """A box of a ``(B, H, W, *C)`` map as ``(B, cell rows, cell cols, gy, gx, *C)``."""
    rows, cols, cell_rows, cell_cols = box[:4]
    part = nhwc[:, rows, cols]  # (B, cr*gy, cc*gx, *C)
    part = part.unflatten(1, (cell_rows.stop - cell_rows.start, -1))  # (B, cr, gy, cc*gx, *C)
    part = part.unflatten(3, (cell_cols.stop - cell_cols.start, -1))  # (B, cr, gy, cc, gx, *C)
    return part.transpose(2, 3)  # (B, cr, cc, gy, gx, *C)


def _cells_box(cells: torch.Tensor, box: Tuple[slice, ...]) -> torch.Tensor:
    """The same box of ``(B, nH, nW, G, G, *C)`` cells."""
    return cells[:, box[2], box[3], box[4], box[5]]  # (B, cr, cc, gy, gx, *C)


def _zero_padding(cells: torch.Tensor, hw: Tuple[int, int], window: int) -> None:
    """Zero the positions of ``(B, nH, nW, G, G, *C)`` cells beyond the ``H x W`` map."""
    nH, nW = cells.shape[1:3]
    if hw[0] < nH * window:
        cells[:, hw[0] // window:].zero_()
    if hw[1] < nW * window:
        cells[:, :, hw[1] // window:].zero_()


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """NCHW for an NCHW-contiguous map, else channels-last (also for the zero-strided
    placeholders of ``with_cp``'s recomputation, whose forward had channels-last maps)."""
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def window_qkv(qkv: torch.Tensor, window: int, pad: Tuple[int, int],
               num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries, keys and values of every ``window x window`` cell of a q/k/v map.

    The values of ``window_partition(pad_bottom_right(qkv, *pad), window)`` split into
    heads, in one copy, with a backward that writes each of the three gradients straight
    into the map's (one strided copy each) instead of autograd's stack and two copies.

    Args:
        qkv: ``(B, 3 * h * d, H, W)``, channels ``[q | k | v]``, each head-major.
        window: cell side G.
        pad: ``(pad_h, pad_w)``, with ``H + pad_h`` and ``W + pad_w`` multiples of G; the
            cells are zero where they cover it.
        num_heads: heads h.

    Returns:
        q, k, v, each ``(B * nH * nW, h, G*G, d)`` (views of one buffer, unit stride along
        d; cells row-major, the pixels of a cell row-major).
    """
    H, W = qkv.shape[-2:]
    if (H + pad[0]) % window or (W + pad[1]) % window:
        raise ValueError(f'window_qkv: a {H}x{W} map padded by {pad} does not divide into '
                         f'{window}x{window} cells; pass at least pad_amounts((H, W), window)')
    return _WindowQKV.apply(qkv, window, pad, num_heads)


class _WindowQKV(torch.autograd.Function):

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, window: int, pad: Tuple[int, int], num_heads: int):
        B, C3, H, W = qkv.shape
        G, h = window, num_heads
        nH, nW = (H + pad[0]) // G, (W + pad[1]) // G
        ctx.geometry = (qkv.shape, memory_format_of(qkv), G, h, nH, nW)
        cells = qkv.new_empty(B, nH, nW, G, G, C3)  # (B, nH, nW, gy, gx, 3C)
        _zero_padding(cells, (H, W), G)
        nhwc = qkv.permute(0, 2, 3, 1)  # (B, H, W, 3C)
        for box in _cell_boxes((H, W), G):
            _cells_box(cells, box).copy_(_map_box(nhwc, box))
        cells = cells.view(B * nH * nW, G * G, 3, h, C3 // (3 * h))  # (B', G*G, 3, h, d)
        return cells.permute(2, 0, 3, 1, 4).unbind(0)  # each (B', h, G*G, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):  # autograd gives zeros for an unused output
        shape, memory_format, G, h, nH, nW = ctx.geometry
        B, _, H, W = shape
        grad_qkv = torch.empty(shape, dtype=grads[0].dtype, device=grads[0].device,
                               memory_format=memory_format)  # (B, 3C, H, W)
        parts = grad_qkv.permute(0, 2, 3, 1).unflatten(-1, (3, h, -1))  # (B, H, W, 3, h, d)
        for i, grad in enumerate(grads):
            part = parts.select(3, i)  # (B, H, W, h, d)
            grad = _cells_as_boxes(grad, (B, nH, nW))  # (B, nH, nW, gy, gx, h, d)
            for box in _cell_boxes((H, W), G):
                _map_box(part, box).copy_(_cells_box(grad, box))
        return grad_qkv, None, None, None


def merge_windows(cells: torch.Tensor, grid: Tuple[int, int, int], hw: Tuple[int, int],
                  memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """Heads and cells back to a map cropped to ``H x W`` (the inverse of
    :func:`window_qkv` for one output), in one copy each way.

    The values of ``crop(window_reverse(cells.transpose(1, 2).reshape(B, nH, nW, G*G, h*d),
    G), hw)``; the backward's gradient is zero at the cells' padded positions.

    Args:
        cells: ``(B * nH * nW, h, G*G, d)``.
        grid: ``(B, nH, nW)``.
        hw: ``(H, W)`` of the map, at most ``(nH * G, nW * G)``.
        memory_format: of the returned map.

    Returns:
        ``(B, h * d, H, W)``.
    """
    G = math.isqrt(cells.shape[2])
    if (G * G != cells.shape[2] or cells.shape[0] != grid[0] * grid[1] * grid[2]
            or hw[0] > grid[1] * G or hw[1] > grid[2] * G):
        raise ValueError(f'merge_windows: {tuple(cells.shape)} cells do not form a grid of '
                         f'{grid[0]} x {grid[1]} x {grid[2]} square cells covering {hw[0]}x{hw[1]}')
    return _MergeWindows.apply(cells, grid, hw, memory_format)


def _cells_as_boxes(cells: torch.Tensor, grid: Tuple[int, int, int]) -> torch.Tensor:
    """``(B', h, G*G, d)`` cells viewed as ``(B, nH, nW, gy, gx, h, d)``."""
    G = math.isqrt(cells.shape[2])
    cells = cells.unflatten(0, grid).unflatten(4, (G, G))  # (B, nH, nW, h, gy, gx, d)
    return cells.permute(0, 1, 2, 4, 5, 3, 6)  # (B, nH, nW, gy, gx, h, d)


class _MergeWindows(torch.autograd.Function):

    @staticmethod
    def forward(ctx, cells: torch.Tensor, grid: Tuple[int, int, int], hw: Tuple[int, int],
                memory_format: torch.memory_format) -> torch.Tensor:
        _, h, GG, d = cells.shape
        ctx.geometry = (cells.shape, grid, hw)
        out = torch.empty((grid[0], h * d, *hw), dtype=cells.dtype, device=cells.device,
                          memory_format=memory_format)  # (B, C, H, W)
        nhwc = out.permute(0, 2, 3, 1).unflatten(-1, (h, d))  # (B, H, W, h, d)
        src = _cells_as_boxes(cells, grid)  # (B, nH, nW, gy, gx, h, d)
        for box in _cell_boxes(hw, math.isqrt(GG)):
            _map_box(nhwc, box).copy_(_cells_box(src, box))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        shape, grid, hw = ctx.geometry
        _, h, GG, d = shape
        G = math.isqrt(GG)
        grad_cells = grad.new_empty(shape)  # (B', h, G*G, d)
        boxes = _cells_as_boxes(grad_cells, grid)  # (B, nH, nW, gy, gx, h, d)
        _zero_padding(boxes, hw, G)
        nhwc = grad.permute(0, 2, 3, 1).unflatten(-1, (h, d))  # (B, H, W, h, d)
        for box in _cell_boxes(hw, G):
            _cells_box(boxes, box).copy_(_map_box(nhwc, box))
        return grad_cells, None, None, None
