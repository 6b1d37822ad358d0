"""A training-mode BatchNorm folded into the expanding 1x1 convolution before it.

``norm(conv(x))`` for a :class:`~.conv.PointwiseConv2d` ``conv`` (``C_in -> C_out``, no bias)
and a BatchNorm ``norm`` in training mode normalises ``y = W x`` with its batch statistics.
They follow from the input's: ``mean(y) = W mean(x)`` and ``var(y)_c = w_c^T S w_c``, with
``S`` the ``C_in x C_in`` covariance of the input's tokens. The normalised map is then one
matrix product with a bias, ``(scale * W) x + shift``, and ``y`` itself is never written.
Where ``C_in < C_out`` (TransCNN's inverted residuals expand 4x) this costs one small
product for ``S`` (``C_in^2`` per token) instead of BatchNorm's passes over the wide map
(two reading it and one writing it forward, three reading and one writing backward), and
keeps the narrow centred input for the backward instead of the wide ``y``.

The backward, in the same terms (``z`` the output, ``a = gamma / std``, ``xc = x - mean(x)``,
``n`` tokens; ``dbeta = sum(dz)``, ``Gc = dz^T xc``, ``dgamma_c = Gc_c . w_c / std_c``)::

    dy  = a * (dz - dbeta / n - yhat * dgamma / n)             # BatchNorm's input gradient
    dW  = a * Gc - n * f * (W S)                              # f = a * dgamma / (n * std)
    dx  = dz (a * W) - (a * dbeta / n) W - xc (W^T diag(f) W)

three products of the sizes the convolution's own backward has, plus one ``C_in x C_in`` one.
The values are BatchNorm's up to rounding (``tests/test_layers.py`` holds outputs, running
statistics and every gradient to ``nn.BatchNorm2d(conv(x))`` in float64; the family
gradients stay at 1e-7 of the reference path in ``tests/test_backbones/test_gradients.py``).

It applies where the CPU training kernels do (:func:`.conv.own_backward_applies`: CPU,
channels-last, eager, no autocast) to float32 / float64 maps with a gradient recorded, to a
non-synchronised ``_BatchNorm`` in training mode after an expanding ``PointwiseConv2d``
without bias of at most :data:`FOLD_MAX_IN_CHANNELS` input channels (wider inputs make ``S``
dearer), and falls back to ``norm(conv(x))`` elsewhere or when :func:`set_norm_fold` (or
``MMHAT_NORM_FOLD=0``) turns it off. The norm's forward hooks do not run where it folds.
"""
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .conv import PointwiseConv2d, own_backward_applies
from .switches import env_switch

_ENABLED = env_switch('MMHAT_NORM_FOLD')

#: the widest input folded: the extra products cost ``C_in^2`` per token, the BatchNorm passes
#: they replace ``C_out``; measured forward + backward, batch 1, one thread (TransCNN-T's
#: inverted residuals at 800x1216): 64 -> 256 at 200x304 1.38x, 128 -> 512 at 100x152 1.19x,
#: 256 -> 1024 at 50x76 0.86x (slower)
FOLD_MAX_IN_CHANNELS = 128


def set_norm_fold(enable: bool) -> None:
    """Use (True, the default) or bypass :func:`pointwise_then_norm`'s folding."""
    global _ENABLED
    _ENABLED = bool(enable)


def use_norm_fold() -> bool:
    return _ENABLED


def _folds(conv: nn.Module, norm: nn.Module, x: torch.Tensor) -> bool:
    return (_ENABLED and torch.is_grad_enabled() and isinstance(conv, PointwiseConv2d)
            and conv.bias is None
            and conv.in_channels < conv.out_channels and conv.in_channels <= FOLD_MAX_IN_CHANNELS
            and isinstance(norm, _BatchNorm) and not isinstance(norm, nn.SyncBatchNorm)
            # widths that do not fit get the conv's or the norm's own error, not a product's
            and x.dim() == 4 and x.shape[1] == conv.in_channels
            and norm.num_features == conv.out_channels
            and norm.training and own_backward_applies(x)
            # the covariance's quadratic forms want float32 or more (BatchNorm's statistics
            # of half-precision maps are computed in float32)
            and x.dtype in (torch.float32, torch.float64)
            and x.shape[0] * x.shape[2] * x.shape[3] > 1)  # BatchNorm's own error otherwise


def pointwise_then_norm(conv: nn.Module, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(conv(x))``; a training-mode BatchNorm after an expanding
    :class:`~.conv.PointwiseConv2d` is folded into it (see the module's docstring), with
    the running statistics updated as ``norm`` would."""
    if not _folds(conv, norm, x):
        return norm(conv(x))
    # the exponential average factor, as nn.BatchNorm2d.forward computes it
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            factor = 1.0 / float(norm.num_batches_tracked)
    return _FoldedNorm.apply(x, conv.weight, norm.weight, norm.bias, norm, factor)


class _FoldedNorm(torch.autograd.Function):
    """:func:`pointwise_then_norm`'s folded path (the parameters are arguments so that
    autograd asks for their gradients)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, gamma: Optional[torch.Tensor],
                beta: Optional[torch.Tensor], norm: _BatchNorm, factor: float) -> torch.Tensor:
        B, C_in, H, W = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(-1, C_in)  # (B*H*W, C_in), a view
        n = tokens.shape[0]
        w = weight.flatten(1)  # (C_out, C_in)
        mean_in = tokens.mean(0)  # (C_in,)
        centred = tokens - mean_in  # (B*H*W, C_in)
        cov = centred.t() @ centred / n  # (C_in, C_in), the biased covariance
        mean = w @ mean_in  # (C_out,)
        var = ((w @ cov) * w).sum(1)  # (C_out,), biased, as BatchNorm normalises with
        invstd = torch.rsqrt(var + norm.eps)  # (C_out,)
        scale = invstd if gamma is None else gamma * invstd  # (C_out,)
        shift = -mean * scale if beta is None else beta - mean * scale  # (C_out,)
        out = torch.addmm(shift, tokens, (w * scale[:, None]).t())  # (B*H*W, C_out)
        if norm.track_running_stats and norm.running_mean is not None:  # unbiased, as BN
            norm.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
            norm.running_var.mul_(1 - factor).add_(var * (n / (n - 1)), alpha=factor)
        ctx.save_for_backward(centred, weight, cov, invstd, scale)
        ctx.has_gamma, ctx.has_beta = gamma is not None, beta is not None
        ctx.x_shape = (B, H, W)
        return out.view(B, H, W, -1).permute(0, 3, 1, 2)  # (B, C_out, H, W), channels-last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        centred, weight, cov, invstd, scale = ctx.saved_tensors
        B, H, W = ctx.x_shape
        C_out = grad.shape[1]
        grad_z = grad.permute(0, 2, 3, 1).reshape(-1, C_out)  # (B*H*W, C_out)
        n = grad_z.shape[0]
        w = weight.flatten(1)  # (C_out, C_in)
        grad_beta = grad_z.sum(0)  # (C_out,)
        grad_centred = grad_z.t() @ centred  # (C_out, C_in): dz^T xc
        grad_gamma = (grad_centred * w).sum(1) * invstd  # (C_out,): sum of dz * yhat
        f = scale * invstd * grad_gamma / n  # (C_out,)
        needs = ctx.needs_input_grad
        grad_x = grad_w = None
        if needs[0]:
            # dx = dz (a W) - (a dbeta / n) W - xc (W^T diag(f) W)
            grad_x = torch.addmm((-scale * grad_beta / n) @ w, grad_z, w * scale[:, None])
            grad_x.addmm_(centred, w.t() @ (w * f[:, None]), alpha=-1)  # (B*H*W, C_in)
            grad_x = grad_x.view(B, H, W, -1).permute(0, 3, 1, 2)  # (B, C_in, H, W)
        if needs[1]:
            grad_w = scale[:, None] * grad_centred - (n * f)[:, None] * (w @ cov)
            grad_w = grad_w.view(weight.shape)  # (C_out, C_in, 1, 1)
        return (grad_x, grad_w, grad_gamma if ctx.has_gamma and needs[2] else None,
                grad_beta if ctx.has_beta and needs[3] else None, None, None)
