"""Family-agnostic building blocks: the attention kernel and layout helpers."""
from .attention import attention, set_fused_attn, use_fused_attn
from .layout import (crop, nchw_to_nlc, nlc_to_nchw, pad_amounts, pad_bottom_right,
                     window_partition, window_reverse)

__all__ = [
    'attention', 'set_fused_attn', 'use_fused_attn', 'crop', 'nchw_to_nlc', 'nlc_to_nchw',
    'pad_amounts', 'pad_bottom_right', 'window_partition', 'window_reverse'
]
