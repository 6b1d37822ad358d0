"""Mixed precision on CPU.

mmengine's ``AmpOptimWrapper`` refuses to run without a GPU. On CPU, bfloat16 autocast
needs no loss scaling (bf16 has float32's exponent range), so a plain ``OptimWrapper``
whose forward runs under ``torch.autocast('cpu', torch.bfloat16)`` is enough, once mmcv's
CPU kernels that only exist in float32 (RoIAlign, NMS) are fed float32 under autocast.
"""
import functools
from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper

from mmhat.registry import OPTIM_WRAPPERS


def _roi_align_float32_under_cpu_autocast(forward):
    """RoIAlign in float32 under CPU autocast, returning the features' dtype (mmdet's RoI
    extractors write the result into a tensor of that dtype)."""

    @functools.wraps(forward)
    def wrapped(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled('cpu'):
            return forward(self, input, rois)
        with torch.autocast('cpu', enabled=False):
            return forward(self, input.float(), rois.float()).to(input.dtype)

    wrapped._mmhat_fp32 = True
    return wrapped


def patch_mmcv_ops_for_cpu_autocast() -> None:
    """Feed float32 to mmcv's CPU kernels that have no bf16/fp16 version under autocast.

    ``RoIAlign`` ("ROIAlign_forward" not implemented for 'BFloat16') and ``nms`` ("expected
    scalar type Float but found BFloat16"). Outside CPU autocast nothing changes; the casts
    are autograd ops, so gradients flow back in the caller's dtype.
    """
    from mmcv.ops.nms import NMSop
    from mmcv.ops.roi_align import RoIAlign
    if not getattr(RoIAlign.forward, '_mmhat_fp32', False):
        RoIAlign.forward = _roi_align_float32_under_cpu_autocast(RoIAlign.forward)
    if not getattr(NMSop.forward, '_mmhat_fp32', False):
        forward = torch.amp.custom_fwd(NMSop.forward, device_type='cpu',
                                       cast_inputs=torch.float32)
        forward._mmhat_fp32 = True
        NMSop.forward = staticmethod(forward)


patch_mmcv_ops_for_cpu_autocast()


@OPTIM_WRAPPERS.register_module()
class BF16AutocastOptimWrapper(OptimWrapper):
    """``OptimWrapper`` running the forward under bfloat16 autocast (CPU or GPU)."""

    def __init__(self, *args, device_type: str = 'cpu', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.device_type = device_type

    @contextmanager
    def optim_context(self, model: torch.nn.Module):
        with super().optim_context(model), torch.autocast(self.device_type,
                                                          dtype=torch.bfloat16):
            yield
