"""Mixed precision on CPU.

mmengine's ``AmpOptimWrapper`` refuses to run without a GPU. On CPU, bfloat16 autocast
needs no loss scaling (bf16 has float32's exponent range), so a plain ``OptimWrapper``
whose forward runs under ``torch.autocast('cpu', torch.bfloat16)`` is enough.
"""
from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper

from mmhat.registry import OPTIM_WRAPPERS


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
