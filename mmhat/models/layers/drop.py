"""Stochastic depth."""
import torch
from mmcv.cnn.bricks import DropPath as _MMCVDropPath
from torch import nn


class DropPath(_MMCVDropPath):
    """mmcv's ``DropPath`` (the same random draws, outputs and gradients) whose per-sample
    mask is not one of the tensors autograd saves for the backward.

    mmcv's ``x.div(keep) * mask`` saves ``mask`` when the product runs, i.e. after the
    residual branch has been computed. Under activation checkpointing that makes the mask
    the last tensor a block saves, and the recomputation, which stops as soon as every saved
    tensor is back (PyTorch's early stop), recomputes the branch's last layer only to reach
    it: the FFN's second linear layer of a GroupMixFormer or Shunted block, whose output
    nothing in the backward needs. Kept on the autograd node instead (``(B, 1, ...)``, one
    number per sample), the mask is not recomputed, and the recomputation stops before
    that layer.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0. or not self.training:
            return x
        keep = 1 - self.drop_prob
        shape = (x.shape[0], ) + (1, ) * (x.ndim - 1)
        mask = (keep + torch.rand(shape, dtype=x.dtype, device=x.device)).floor()  # (B, 1, ...)
        if not torch.is_grad_enabled() or not x.requires_grad:
            return x.div(keep) * mask
        return _DropPath.apply(x, mask, keep)


class _DropPath(torch.autograd.Function):
    """``x.div(keep) * mask`` with ``mask`` on the node, outside the saved tensors."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, keep: float) -> torch.Tensor:
        ctx.mask, ctx.keep = mask, keep
        return x.div(keep) * mask

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        # the order of autograd's backward of div-then-mul: the same rounding
        return (grad * ctx.mask).div(ctx.keep), None, None


def drop_path(rate: float) -> nn.Module:
    """:class:`DropPath` ``(rate)`` on a residual branch, or ``Identity`` when ``rate`` is 0
    (the official models build no module there, so state dicts and outputs are unchanged)."""
    return DropPath(rate) if rate > 0 else nn.Identity()
