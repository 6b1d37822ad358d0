"""The softmax attention kernel shared by the families, and attention inside windows.

Two paths compute the same thing, ``softmax(q k^T * scale + mask) v``:

* fused: :func:`torch.nn.functional.scaled_dot_product_attention`, which never
  materialises the (N_q, N_k) matrix on its flash / memory-efficient backends;
* explicit: the textbook matmul-softmax-matmul, kept as the readable reference and as
  the fallback where SDPA is unavailable.

The scale is always passed explicitly, so both paths agree whatever the head width.
Which path runs is chosen per module (``fused=True/False``) with a process-wide default
(:func:`set_fused_attn`, or the environment variable ``MMHAT_FUSED_ATTN=0``), as timm's
``fused_attn`` does. :func:`record_attention_calls` lists the calls a forward makes (shapes,
strides, dtypes, mask), which is how ``mmhat.utils.sdpa`` predicts the CUDA kernel of each.
"""
import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from mmhat import compat
from .conv import PointwiseConv2d, conv_with_own_gradients
from .layout import (crop, memory_format_of, merge_windows, pad_bottom_right, window_partition,
                     window_qkv, window_reverse)
from .switches import env_switch

_FUSED_DEFAULT = env_switch('MMHAT_FUSED_ATTN')
_RECORDERS: List[Callable[['AttentionCall'], None]] = []
#: the :class:`KeptAttention` of the checkpointed forward or recomputation running now
_KEPT: List['KeptAttention'] = []
_REPLAY_DEFAULT = env_switch('MMHAT_CP_REPLAY_ATTN')
_WINDOW_COPIES = env_switch('MMHAT_WINDOW_COPIES')


def set_fused_attn(enable: bool) -> None:
    """Set the default attention path for modules built with ``fused=None``."""
    global _FUSED_DEFAULT
    _FUSED_DEFAULT = bool(enable)


def use_fused_attn(fused: Optional[bool] = None) -> bool:
    """Resolve a module's ``fused`` argument against the process-wide default."""
    return _FUSED_DEFAULT if fused is None else bool(fused)


def set_attention_replay(enable: bool) -> None:
    """Whether ``with_cp`` keeps the fused attention of a block (and the products of
    :func:`kept_linear`) and replays them in the recomputation (:class:`KeptAttention`;
    default True, ``MMHAT_CP_REPLAY_ATTN=0``: off, the whole block is recomputed)."""
    global _REPLAY_DEFAULT
    _REPLAY_DEFAULT = bool(enable)


def use_attention_replay() -> bool:
    return _REPLAY_DEFAULT


@dataclass(frozen=True)
class AttentionCall:
    """One call of :func:`attention`, as the kernel saw its operands (after the fused path
    made them unit-stride)."""
    q_shape: Tuple[int, ...]
    k_shape: Tuple[int, ...]
    v_shape: Tuple[int, ...]
    q_stride: Tuple[int, ...]
    k_stride: Tuple[int, ...]
    v_stride: Tuple[int, ...]
    dtype: torch.dtype
    device: str
    mask_shape: Optional[Tuple[int, ...]]
    mask_stride: Optional[Tuple[int, ...]]
    mask_dtype: Optional[torch.dtype]
    fused: bool
    scale: float
    #: storage offsets of q, k, v in elements (views of one qkv tensor start inside it);
    #: CUDA's memory-efficient kernel needs their byte offsets aligned
    storage_offsets: Tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def of(cls, q, k, v, attn_mask, fused: bool, scale: float) -> 'AttentionCall':
        return cls(tuple(q.shape), tuple(k.shape), tuple(v.shape), q.stride(), k.stride(),
                   v.stride(), q.dtype, q.device.type,
                   None if attn_mask is None else tuple(attn_mask.shape),
                   None if attn_mask is None else attn_mask.stride(),
                   None if attn_mask is None else attn_mask.dtype, fused, scale,
                   (q.storage_offset(), k.storage_offset(), v.storage_offset()))


@contextlib.contextmanager
def record_attention_calls() -> Iterator[List[AttentionCall]]:
    """Inside the block, every :func:`attention` call is appended to the yielded list."""
    calls: List[AttentionCall] = []
    _RECORDERS.append(calls.append)
    try:
        yield calls
    finally:
        _RECORDERS.remove(calls.append)


class KeptAttention:
    """The fused attention outputs of one activation-checkpointed forward, which its
    recomputation replays instead of computing them again.

    Activation checkpointing (``with_cp``) frees a block's activations after its forward and
    recomputes the block in the backward. The fused kernel's own saved tensors (q, k, v, its
    output and log-sum-exp) are small next to the block's (a few channels-wide maps against
    the FFN's expanded ones), and the kernel is the costliest part of the forward. So inside
    :meth:`forward`, :func:`attention` keeps what SDPA saves for its backward (outside the
    checkpoint's saved-tensor hooks) and remembers its output; inside :meth:`recomputation`
    it hands the same outputs back, in call order, and computes nothing. The values the
    recomputation produces are the forward's exactly. The explicit path keeps nothing: its
    (N_q, N_k) matrix is what checkpointing exists to free. Nor are the projections that
    only feed a replayed kernel multiplied again (:func:`attention_input`): in a HAT-Net
    block the q/k/v products are four of the five attention GEMMs. The products of
    :func:`kept_linear` are kept and handed back the same way, in the same call order.
    """

    def __init__(self) -> None:
        self.outputs: List[Optional[torch.Tensor]] = []
        self.replaying = False
        self.next = 0

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        self.outputs, self.replaying = [], False
        _KEPT.append(self)
        try:
            yield
        finally:
            _KEPT.remove(self)

    @contextlib.contextmanager
    def recomputation(self) -> Iterator[None]:
        self.replaying, self.next = True, 0
        _KEPT.append(self)
        try:
            yield
        finally:
            _KEPT.remove(self)

    def replay(self) -> torch.Tensor:
        if self.next >= len(self.outputs):
            raise RuntimeError('the recomputation of a checkpointed block asked for more '
                               'kept outputs (fused attention, kept_linear) than its forward '
                               'kept')
        out = self.outputs[self.next]
        self.next += 1
        # a leaf that requires a gradient like the forward's output did, so that the ops after
        # it save the same tensors (an op saves less for an input that needs no gradient)
        return out.detach().requires_grad_(out.requires_grad)


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


def _replaying(fused: bool) -> Optional[KeptAttention]:
    """The :class:`KeptAttention` whose recomputation runs now, if the fused path is
    taken (the explicit path keeps nothing, so it is always computed)."""
    kept = _KEPT[-1] if fused and _KEPT else None
    return kept if kept is not None and kept.replaying else None


def attention_input(proj: PointwiseConv2d, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """``proj(x)`` for a 1x1 projection whose output only feeds :func:`attention` /
    :func:`window_attention` (through views, pads and window cuts, which save nothing for
    the backward): queries, keys, values.

    Inside an activation-checkpointed forward that keeps the fused attention
    (:class:`KeptAttention`), the projection keeps only ``x`` for its backward (the
    gradients of :meth:`PointwiseConv2d.gradients`), and in the recomputation, which
    replays the attention's output, its product is not computed again: the output would
    only feed the replayed kernel, so a placeholder of its shape stands in (zero strides:
    every view of it is free; :func:`attention` and :func:`window_attention` return the
    kept output before touching it). The backward's values are those of ``proj(x)``;
    elsewhere (no checkpoint, the explicit path, autocast) this is ``proj(x)``.
    """
    kept = _KEPT[-1] if fused and _KEPT else None
    if kept is None or compat.is_autocast_enabled(x.device.type):
        return proj(x)
    if not kept.replaying:
        return conv_with_own_gradients(proj, x, proj.training_forward)
    B, _, H, W = x.shape
    return conv_with_own_gradients(proj, x, lambda t: t.new_zeros(()).expand(
        B, proj.out_channels, H, W))  # (B, C_out, H, W), zero strides


def kept_linear(x: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose product an activation-checkpointed forward keeps
    (in its :class:`KeptAttention`) and its recomputation hands back instead of multiplying
    again.

    A linear layer's backward needs only its input, so its output can be kept like the
    fused attention's: the layer keeps ``x`` for its backward (restored by the
    recomputation, as every saved tensor), the product is remembered outside the
    checkpoint, and the recomputation, which must still reach ``x`` and whatever reads the
    product, gets the product without the GEMM. It costs the product's memory for the
    checkpointed block's lifetime, so a family calls it where a kept element saves many
    multiply-adds (its input width) and the maps are small (GroupMixFormer:
    :data:`~mmhat.models.backbones.groupmixformer.KEEP_PRODUCTS_FROM_STAGE`). Elsewhere (no
    checkpoint, replay off, autocast) it is ``F.linear``; the gradients are ``F.linear``'s.

    Args:
        x: ``(..., in_features)``.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features, )`` or None.

    Returns:
        ``(..., out_features)``.
    """
    kept = _KEPT[-1] if _KEPT else None
    if kept is None or compat.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)
    return _KeptLinear.apply(x, weight, bias, kept)


class _KeptLinear(torch.autograd.Function):
    """:func:`kept_linear` inside a checkpointed forward or its recomputation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                kept: 'KeptAttention') -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if kept.replaying:
            # a new tensor object over the kept storage: autograd makes it this node's output
            return kept.replay().detach()
        out = F.linear(x, weight, bias)
        kept.outputs.append(out.detach())
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight  # (..., in_features)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            grad_2d = grad.reshape(-1, grad.shape[-1])  # (tokens, out_features)
            if ctx.needs_input_grad[1]:
                grad_w = grad_2d.t() @ x.reshape(-1, x.shape[-1])  # (out, in)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = grad_2d.sum(0)  # (out_features, )
        return grad_x, grad_w, grad_b, None


def attention(q: torch.Tensor,
              k: torch.Tensor,
              v: torch.Tensor,
              scale: float,
              attn_mask: Optional[torch.Tensor] = None,
              fused: bool = True) -> torch.Tensor:
    """Multi-head softmax attention.

    Args:
        q: queries, ``(..., N_q, d)`` (any leading batch/head dims).
        k: keys, ``(..., N_k, d)``.
        v: values, ``(..., N_k, d_v)``.
        scale: multiplier of the logits (usually ``d ** -0.5``).
        attn_mask: optional boolean mask broadcastable to ``(..., N_q, N_k)``;
            ``True`` means the key takes part. Every query must see at least one key.
        fused: use ``F.scaled_dot_product_attention`` instead of the explicit path.

    Returns:
        ``(..., N_q, d_v)``.
    """
    kept = _replaying(fused)
    if kept is not None:
        return kept.replay()  # before any copy: q, k and v may be placeholders here
    if fused:
        # The CPU flash kernel needs unit stride along d; with any other layout SDPA
        # silently falls back to its math backend, which materialises the (N_q, N_k)
        # matrix. One copy of q/k/v is far cheaper than that.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if _RECORDERS:
        call = AttentionCall.of(q, k, v, attn_mask, fused, scale)
        for record in _RECORDERS:
            record(call)
    if fused:
        kept = _KEPT[-1] if _KEPT else None
        q, sdpa_scale = compat.sdpa_scale_for_export(q, scale)
        if kept is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=sdpa_scale)
        # the innermost saved-tensor hooks win: these keep SDPA's tensors out of the checkpoint
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=sdpa_scale)
        kept.outputs.append(out.detach().requires_grad_(out.requires_grad))
        return out
    # Scale the logits, not q: the official models do, and only the same operation order
    # reproduces them to float rounding.
    logits = (q @ k.transpose(-2, -1)) * scale  # (..., N_q, N_k)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float('-inf'))
    return logits.softmax(dim=-1) @ v  # (..., N_q, d_v)


def window_attention(qkv: torch.Tensor,
                     window: int,
                     num_heads: int,
                     scale: float,
                     pad: Tuple[int, int],
                     fused: bool = True) -> torch.Tensor:
    """Multi-head attention inside non-overlapping ``window x window`` cells of a map.

    The map is zero-padded at the bottom/right by ``pad`` rows/columns (the caller gives at
    least :func:`~mmhat.models.layers.pad_amounts` of the window, so that the sides divide
    it), padded keys are masked out of every cell's attention, and the result is cropped
    back. With any larger padding the valid outputs are the same: padded keys get no weight,
    and cells of padding only are cropped away.

    In eager mode the cells are cut and merged in one copy each way
    (:func:`~mmhat.models.layers.layout.window_qkv` / ``merge_windows``), and the output is
    channels-last unless ``qkv`` is NCHW-contiguous; tracing, scripting, ONNX export,
    ``torch.compile`` and :func:`set_window_copies` ``(False)`` take the same values through
    pad, views and reshapes (an NCHW-contiguous output).

    Args:
        qkv: ``(B, 3 * h * d, H, W)``, channels ``[q | k | v]``, each head-major.
        window: cell side G.
        num_heads: heads h.
        scale: logit multiplier.
        pad: ``(pad_h, pad_w)`` zero rows/columns added at the bottom/right.
        fused: attention path of :func:`attention`.

    Returns:
        ``(B, h * d, H, W)``.
    """
    B, C3, H, W = qkv.shape
    G, h = window, num_heads
    pad_h, pad_w = pad
    nH, nW = (H + pad_h) // G, (W + pad_w) // G
    one_copy = _WINDOW_COPIES and _eager()
    kept = _replaying(fused)
    if kept is not None:
        # a recomputation replaying the kernel: the cells are not cut (nothing saves them)
        out = kept.replay()  # (B', h, G*G, d)
    else:
        if one_copy:
            q, k, v = window_qkv(qkv, G, pad, h)  # each (B', h, G*G, d)
        else:
            padded = pad_bottom_right(qkv, pad_h, pad_w)  # (B, 3C, Hp, Wp)
            cells = window_partition(padded, G)  # (B, nH, nW, G*G, 3C)
            cells = cells.reshape(B * nH * nW, G * G, 3, h, C3 // (3 * h))  # (B', G*G, 3, h, d)
            q, k, v = cells.permute(2, 0, 3, 1, 4).unbind(0)  # each (B', h, G*G, d)
        mask = None
        if pad_h or pad_w:
            mask = _valid_key_mask((H, W), (nH * G, nW * G), G,
                                   qkv.device)  # (nH*nW, 1, 1, G*G)
            mask = mask.repeat(B, 1, 1, 1)  # (B', 1, 1, G*G)
        out = attention(q, k, v, scale, attn_mask=mask, fused=fused)  # (B', h, G*G, d)
    if one_copy:
        return merge_windows(out, (B, nH, nW), (H, W), memory_format_of(qkv))  # (B, C, H, W)
    out = out.transpose(1, 2).reshape(B, nH, nW, G * G, C3 // 3)  # (B, nH, nW, G*G, C)
    return crop(window_reverse(out, G), (H, W))  # (B, C, H, W)


def set_window_copies(enable: bool) -> None:
    """Cut and merge windows in one copy each way (True, the default:
    :func:`~mmhat.models.layers.layout.window_qkv` / ``merge_windows``) or by pad, views and
    reshapes (False; what tracing and export always use)."""
    global _WINDOW_COPIES
    _WINDOW_COPIES = bool(enable)


def use_window_copies() -> bool:
    return _WINDOW_COPIES


def _eager() -> bool:
    """Not tracing, scripting, exporting or compiling: autograd Functions may run."""
    return not (torch.jit.is_tracing() or torch.jit.is_scripting()
                or torch.onnx.is_in_onnx_export() or compat.is_compiling())


def _valid_key_mask(hw: Tuple[int, int], padded_hw: Tuple[int, int], window: int,
                    device: torch.device) -> torch.Tensor:
    """``(nH*nW, 1, 1, G*G)`` bool: True where a cell's key is a real pixel.

    Cells made only of padding (only with more than the minimal padding) attend to
    everything: their outputs are cropped away, and this avoids NaN rows.
    """
    valid = torch.zeros(1, 1, *padded_hw, dtype=torch.bool, device=device)
    valid[..., :hw[0], :hw[1]] = True
    cells = window_partition(valid, window).flatten(0, 2).squeeze(-1)  # (nH*nW, G*G)
    cells = cells | ~cells.any(dim=1, keepdim=True)  # (nH*nW, G*G)
    return cells[:, None, None, :]  # (nH*nW, 1, 1, G*G)
