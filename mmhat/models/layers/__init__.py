"""Family-agnostic building blocks: the attention kernel, convolutions with CPU training
kernels, layout helpers, drop path."""
from .attention import (AttentionCall, KeptAttention, attention, attention_input, kept_linear,
                        record_attention_calls, set_attention_replay, set_fused_attn,
                        set_window_copies, use_attention_replay, use_fused_attn,
                        use_window_copies, window_attention)
from .conv import (DepthwiseConv2d, PointwiseConv2d, act_then_conv, depthwise_conv2d,
                   set_act_recompute, set_cpu_kernels, use_act_recompute, use_cpu_kernels)
from .drop import drop_path
from .norm import pointwise_then_norm, set_norm_fold, use_norm_fold
from .layout import (ceil_pool2d, crop, head_dims, merge_heads, merge_heads_nchw,
                     merge_windows, nchw_to_nlc, nlc_to_nchw, pad_amounts, pad_bottom_right,
                     split_heads, split_heads_nchw, window_partition, window_qkv,
                     window_reverse)

__all__ = [
    'AttentionCall', 'KeptAttention', 'attention', 'attention_input', 'kept_linear',
    'record_attention_calls', 'set_attention_replay', 'set_fused_attn', 'use_attention_replay',
    'use_fused_attn', 'set_window_copies', 'use_window_copies', 'window_attention',
    'DepthwiseConv2d', 'PointwiseConv2d', 'act_then_conv', 'depthwise_conv2d', 'set_act_recompute',
    'set_cpu_kernels',
    'use_act_recompute', 'use_cpu_kernels', 'pointwise_then_norm', 'set_norm_fold',
    'use_norm_fold', 'drop_path', 'ceil_pool2d', 'crop', 'head_dims',
    'merge_heads', 'merge_heads_nchw', 'merge_windows', 'nchw_to_nlc', 'nlc_to_nchw',
    'pad_amounts', 'pad_bottom_right', 'split_heads', 'split_heads_nchw', 'window_partition',
    'window_qkv', 'window_reverse'
]
