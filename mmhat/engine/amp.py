"""Mixed precision on CPU.

mmengine's ``AmpOptimWrapper`` refuses to run without a GPU. On CPU, bfloat16 autocast
needs no loss scaling (bf16 has float32's exponent range), so a plain ``OptimWrapper``
whose forward runs under ``torch.autocast('cpu', torch.bfloat16)`` is enough, once mmcv's
CPU kernels that only exist in float32 (RoIAlign, NMS) are fed float32 under autocast.
:class:`BF16AutocastOptimWrapper` does both, and only inside its forward context: outside
it mmcv is left as it is.
"""
import contextlib
import functools

import torch
from mmengine.optim import OptimWrapper

from mmhat import compat
from mmhat.registry import OPTIM_WRAPPERS


def _roi_align_in_float32(forward):
    """RoIAlign in float32 under CPU autocast, returning the features' dtype (mmdet's RoI
    extractors write the result into a tensor of that dtype)."""

    @functools.wraps(forward)
    def wrapped(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if not compat.is_autocast_enabled('cpu'):
            return forward(self, input, rois)
        with torch.autocast('cpu', enabled=False):
            return forward(self, input.float(), rois.float()).to(input.dtype)

    return wrapped


@contextlib.contextmanager
def float32_mmcv_ops_under_cpu_autocast():
    """Inside the block, feed float32 to mmcv's CPU kernels that have no bf16/fp16 version.

    ``RoIAlign`` ("ROIAlign_forward" not implemented for 'BFloat16') and ``nms`` ("expected
    scalar type Float but found BFloat16"). The casts are autograd ops, so gradients flow
    back in the caller's dtype. Without compiled mmcv ops (mmcv-lite) there is nothing to
    cast. The original methods are restored on exit.
    """
    try:
        from mmcv.ops.nms import NMSop
        from mmcv.ops.roi_align import RoIAlign
    except ImportError:  # mmcv without ops: no RoIAlign / NMS to feed
        yield
        return
    saved = [(RoIAlign, 'forward', vars(RoIAlign)['forward']),
             (NMSop, 'forward', vars(NMSop)['forward'])]
    RoIAlign.forward = _roi_align_in_float32(RoIAlign.forward)
    NMSop.forward = staticmethod(
        compat.custom_fwd(NMSop.forward, device_type='cpu', cast_inputs=torch.float32))
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


@OPTIM_WRAPPERS.register_module()
class BF16AutocastOptimWrapper(OptimWrapper):
    """``OptimWrapper`` running the forward under bfloat16 autocast (CPU or GPU).

    Usage: ``optim_wrapper = dict(type='mmhat.BF16AutocastOptimWrapper', optimizer=...)``
    (``tools/train.py --amp`` sets it where there is no GPU).

    Args:
        device_type: ``'cpu'`` or ``'cuda'``, the autocast device.
    """

    def __init__(self, *args, device_type: str = 'cpu', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.device_type = device_type

    @contextlib.contextmanager
    def optim_context(self, model: torch.nn.Module):
        with contextlib.ExitStack() as stack:
            stack.enter_context(super().optim_context(model))
            stack.enter_context(torch.autocast(self.device_type, dtype=torch.bfloat16))
            if self.device_type == 'cpu':
                stack.enter_context(float32_mmcv_ops_under_cpu_autocast())
            yield
