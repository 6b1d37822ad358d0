"""The softmax attention kernel shared by every family.

Two paths compute the same thing, ``softmax(q k^T * scale + mask) v``:

* fused: :func:`torch.nn.functional.scaled_dot_product_attention`, which never
  materialises the (N_q, N_k) matrix on the memory-efficient / flash backends;
* explicit: the textbook matmul-softmax-matmul, kept as the readable reference and as
  the fallback where SDPA is unavailable.

The scale is always passed explicitly, so both paths agree whatever the head width.
Which path runs is chosen per module (``fused=True/False``) with a process-wide default
(:func:`set_fused_attn`, or the environment variable ``MMHAT_FUSED_ATTN=0``), as timm's
``fused_attn`` does.
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F

_FUSED_DEFAULT = os.environ.get('MMHAT_FUSED_ATTN', '1') not in ('0', 'false', 'False')


def set_fused_attn(enable: bool) -> None:
    """Set the default attention path for modules built with ``fused=None``."""
    global _FUSED_DEFAULT
    _FUSED_DEFAULT = bool(enable)


def use_fused_attn(fused: Optional[bool] = None) -> bool:
    """Resolve a module's ``fused`` argument against the process-wide default."""
    return _FUSED_DEFAULT if fused is None else bool(fused)


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
    if fused:
        # The CPU flash kernel needs unit stride along d; with any other layout SDPA
        # silently falls back to its math backend, which materialises the (N_q, N_k)
        # matrix (4.5x slower for HAT-Net's global level at 800x1216). One copy of
        # q/k/v is far cheaper than that.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    # Scale the logits, not q: the official TransCNN does, and its stand-in reference is
    # ill-conditioned enough in stages 3-4 that only the same operation order reproduces it.
    logits = (q @ k.transpose(-2, -1)) * scale  # (..., N_q, N_k)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float('-inf'))
    return logits.softmax(dim=-1) @ v  # (..., N_q, d_v)
