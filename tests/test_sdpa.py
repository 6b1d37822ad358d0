"""The CUDA SDPA kernel prediction (``mmhat.utils.sdpa``).

The first tests are PyTorch's dispatcher rules on hand-made calls; each expected verdict is
the one the named check of ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`` /
``sdp_utils_cpp.h`` gives (quoted in the comments), not what the code under test says. The
last ones are the property the project keeps: every SDPA call of every family is eligible
for an efficient kernel in fp16 and bf16 on the target GPU (H200, sm90).
"""
import dataclasses
from typing import Optional, Tuple

import pytest
import torch

from mmhat.models.layers import AttentionCall, record_attention_calls
from mmhat.utils import sdpa

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


def contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    strides, n = [], 1
    for size in reversed(shape):
        strides.insert(0, n)
        n *= size
    return tuple(strides)


def make_call(q=(2, 4, 128, 64), k=None, v=None, mask: Optional[Tuple[int, ...]] = None,
              mask_dtype=torch.bool, dtype=FP16, **changes) -> AttentionCall:
    """Contiguous q, k, v (k, v default to q's shape) and optionally a contiguous mask."""
    k = k or q
    v = v or k
    call = AttentionCall(q, k, v, contiguous_strides(q), contiguous_strides(k),
                         contiguous_strides(v), dtype, 'cuda', mask,
                         None if mask is None else contiguous_strides(mask),
                         None if mask is None else mask_dtype, True, q[-1]**-0.5)
    return dataclasses.replace(call, **changes)


def eligible(call, dtype=FP16, sm=(9, 0), **kw):
    return {name for name, v in sdpa.eligible_backends(call, dtype, sm, **kw).items()
            if v.eligible and name != 'math'}


def test_plain_call_takes_every_fused_kernel_and_cudnn_first_on_sm90():
    call = make_call()
    assert eligible(call, FP16) == eligible(call, BF16) == {'flash', 'efficient', 'cudnn'}
    # priority_order: cuDNN first on sm90 with cuDNN > 9.15.0 (check_prefer_cudnn_attention)
    assert sdpa.predicted_backend(call, FP16) == 'cudnn'
    # and flash first (the context's default order) with an older cuDNN
    assert sdpa.predicted_backend(call, FP16, cudnn_version=91500) == 'flash'


def test_priority_order():
    assert sdpa.priority_order((9, 0), 91501) == ('cudnn', 'flash', 'efficient', 'math')
    assert sdpa.priority_order((10, 0), 91700) == ('cudnn', 'flash', 'efficient', 'math')
    default = ('flash', 'efficient', 'math', 'cudnn')
    assert sdpa.priority_order((9, 0), 91500) == default  # "cudnn_version > 91500"
    assert sdpa.priority_order((8, 0), 91700) == default  # "major == 9 || major == 10"
    assert sdpa.priority_order((9, 0), 91700, cudnn_deprioritized=True) == default
    # CUDA < 13 builds prefer cuDNN only on minor 0 or 3 ("!minor || minor == 3")
    assert sdpa.priority_order((10, 1), 91700, cuda_version=(12, 8)) == default
    assert sdpa.priority_order((10, 1), 91700, cuda_version=(13, 0))[0] == 'cudnn'


def test_head_dims():
    # check_head_dim_size_flash: "same last dimension and ... less than or equal to 256";
    # mem-efficient has no upper limit, only alignment; cuDNN: "no more than 128" on cuDNN
    # 9.15 (256 on sm90 from cuDNN > 9.22)
    wide = make_call(q=(2, 4, 128, 512))
    assert eligible(wide) == {'efficient'}
    assert sdpa.predicted_backend(wide, FP16) == 'efficient'
    d256 = make_call(q=(2, 4, 128, 256))
    assert eligible(d256) == {'flash', 'efficient'}
    assert eligible(d256, cudnn_version=92300) == {'flash', 'efficient', 'cudnn'}
    # head dim 20: flash pads it to 24 itself (attention.cpp pad_last_dim<8>); mem-efficient
    # needs a multiple of minimum_gemm_alignment (8 for fp16 on sm80+, 4 for fp32); cuDNN "a
    # multiple of 8"
    d20 = make_call(q=(2, 4, 128, 20))
    assert eligible(d20, FP16) == {'flash'}
    assert eligible(d20, FP32) == {'efficient'}
    # q/v head dims may differ for mem-efficient and cuDNN, never for flash
    dv = make_call(q=(2, 4, 128, 64), v=(2, 4, 128, 32))
    assert eligible(dv) == {'efficient', 'cudnn'}


def test_masks():
    b, h, n = 8, 2, 49
    # check_for_attn_mask: "Flash Attention does not support non-null attn_mask"; a boolean
    # (B, 1, 1, N_k) mask passes check_attn_mask_shape ("4d - ({Batch, 1} x {Num_heads, 1} x
    # {Q_seq_len, 1} x {KV_seq_len, 1})")
    window = make_call(q=(b, h, n, 48), mask=(b, 1, 1, n))
    assert eligible(window) == {'efficient', 'cudnn'}
    assert sdpa.predicted_backend(window, FP16) == 'cudnn'
    assert sdpa.predicted_backend(window, FP16, cudnn_version=91500) == 'efficient'
    # an additive float mask of q's dtype: the same kernels
    additive = make_call(q=(b, h, n, 48), mask=(b, h, n, n), mask_dtype=FP16)
    assert eligible(additive, FP16) == {'efficient', 'cudnn'}
    # 3-D masks fail check_attn_mask_shape (cuDNN), mem-efficient takes them
    assert eligible(make_call(q=(b, h, n, 48), mask=(1, n, n))) == {'efficient'}
    # a (B, 1, 1, N_k) mask whose B is neither 1 nor the batch fails cuDNN's shape check
    assert eligible(make_call(q=(b, h, n, 48), mask=(2, 1, 1, n))) == {'efficient'}
    # a float32 mask with fp16 q passes validate_sdpa_input ("bool or float or ... query
    # dtype"), but the mem-efficient kernel raises "invalid dtype for bias - should match
    # query's dtype" after the dispatcher chose it: an error, not a fallback
    fp32_mask = make_call(q=(b, h, n, 48), mask=(b, 1, 1, n), mask_dtype=FP32)
    verdicts = sdpa.eligible_backends(fp32_mask, FP16)
    assert not verdicts['efficient'].eligible and verdicts['efficient'].fatal
    assert sdpa.predicted_backend(fp32_mask, FP16, cudnn_version=91500) == 'error'
    # any other mask dtype is refused by validate_sdpa_input on every backend
    int_mask = make_call(q=(b, h, n, 48), mask=(b, 1, 1, n), mask_dtype=torch.int64)
    assert sdpa.predicted_backend(int_mask, FP16) == 'error'


def test_strides_and_offsets():
    call = make_call()
    # check_last_dim_stride_equals_1_dense: "the last dimension of the input to have stride 1"
    q_stride = call.q_stride[:-1] + (2, )
    assert eligible(dataclasses.replace(call, q_stride=q_stride)) == set()
    assert sdpa.predicted_backend(dataclasses.replace(call, q_stride=q_stride), FP16) == 'math'
    # ... and, on GPU, the mask's last dimension too (a mask expanded over the keys: stride 0)
    window = make_call(q=(8, 2, 49, 48), mask=(8, 1, 1, 49))
    expanded = dataclasses.replace(window, mask_stride=(1, 1, 1, 0))
    assert eligible(expanded) == set()
    # check_data_ptr_alignment_mem_efficient: storage offsets of q, k, v aligned to
    # minimum_gemm_alignment elements (8 for fp16, 4 for fp32) on sm80+
    shifted = dataclasses.replace(call, storage_offsets=(0, 4, 8))
    assert eligible(shifted, FP16) == {'flash', 'cudnn'}
    assert eligible(shifted, FP32) == {'efficient'}
    assert eligible(dataclasses.replace(call, storage_offsets=(0, 64, 128)), FP16) == {
        'flash', 'efficient', 'cudnn'}


def test_dtypes_and_hardware():
    call = make_call()
    # fp32: check_dtypes_flash_attention / check_dtypes_low_precision refuse it; mem-efficient
    # takes Half, Float, BFloat16 on sm80+
    assert eligible(call, FP32) == {'efficient'}
    assert sdpa.predicted_backend(call, FP32) == 'efficient'
    # sm75 (T4): flash and cuDNN need sm80+, mem-efficient has no bf16 below sm80
    assert eligible(call, FP16, sm=(7, 5)) == {'efficient'}
    assert eligible(call, BF16, sm=(7, 5)) == set()
    assert sdpa.predicted_backend(call, BF16, sm=(7, 5)) == 'math'
    # flash and mem-efficient support [sm80 | sm50, sm121]
    assert eligible(call, FP16, sm=(12, 1)) >= {'flash', 'efficient'}
    assert eligible(call, FP16, sm=(13, 0)) == set()


def test_shapes_batch_heads_and_the_rest():
    # check_tensor_shapes: "4 dimensional"
    assert eligible(make_call(q=(8, 128, 64))) == set()
    # check_batch_size_and_num_heads_dense: dense batches are not broadcast
    assert eligible(make_call(q=(2, 4, 128, 64), k=(1, 4, 128, 64))) == set()
    # heads: only with enable_gqa, kv heads dividing the query heads
    gqa = make_call(q=(2, 8, 128, 64), k=(2, 2, 128, 64))
    assert eligible(gqa) == set()
    assert eligible(gqa, enable_gqa=True) == {'flash', 'efficient', 'cudnn'}
    # check_cudnn_tensor_shapes: "does not support key/value sequence length 1"
    assert eligible(make_call(q=(2, 4, 128, 64), k=(2, 4, 1, 64))) == {'flash', 'efficient'}
    # ... and "batch size or num_heads greater than 65535"
    assert eligible(make_call(q=(70000, 1, 49, 64))) == {'flash', 'efficient'}
    # check_cudnn_deterministic
    assert eligible(make_call(), deterministic=True) == {'flash', 'efficient'}
    # check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_or_120: training with a
    # head dim in (192, 224] on sm86-89
    d208 = make_call(q=(2, 4, 128, 208))
    assert 'flash' in eligible(d208, sm=(8, 6))
    assert 'flash' not in eligible(d208, sm=(8, 6), training=True)
    assert 'flash' in eligible(d208, sm=(9, 0), training=True)
    # check_flash_causal_non_square_seqlens
    rect = make_call(q=(2, 4, 128, 64), k=(2, 4, 96, 64))
    assert 'flash' not in eligible(rect, is_causal=True)
    assert 'flash' in eligible(rect)


def test_reasons_name_the_pytorch_checks():
    verdicts = sdpa.eligible_backends(make_call(q=(8, 2, 49, 20), mask=(8, 1, 1, 49)), FP16)
    assert any(r.startswith('check_for_attn_mask') for r in verdicts['flash'].reasons)
    assert any(r.startswith('check_head_dim_size_mem_efficient')
               for r in verdicts['efficient'].reasons)
    assert any(r.startswith('check_cudnn_tensor_shapes') for r in verdicts['cudnn'].reasons)


# ---------------------------------------------------------------------------------------
# The families
# ---------------------------------------------------------------------------------------
SIZES = [(800, 1216), (801, 1213)]  # a detection size, and one where every stage pads
FUSED_FAMILIES = [cls for cls in sdpa.registered_families() if cls.fused_attention]


@pytest.fixture(scope='module')
def recorded():
    return {(cls.__name__, hw): sdpa.record_family_calls(cls, hw, batch=2)
            for cls in FUSED_FAMILIES for hw in SIZES}


def test_families_without_a_fused_path_make_no_sdpa_call():
    assert FUSED_FAMILIES, 'no registered family has a fused attention path'
    for cls in sdpa.registered_families():
        if not cls.fused_attention:
            model = cls(arch=cls.smallest_arch).eval()
            with torch.no_grad(), record_attention_calls() as calls:
                model(torch.zeros(1, 3, 64, 64))
            assert calls == []
            assert sdpa.record_family_calls(cls, (64, 64), batch=1) == []


@pytest.mark.parametrize('dtype', [FP16, BF16], ids=['fp16', 'bf16'])
@pytest.mark.parametrize('hw', SIZES, ids=lambda hw: f'{hw[0]}x{hw[1]}')
@pytest.mark.parametrize('cls', FUSED_FAMILIES, ids=lambda cls: cls.__name__)
def test_every_sdpa_call_has_an_efficient_kernel_on_h200(recorded, cls, hw, dtype):
    calls = recorded[(cls.__name__, hw)]
    assert calls, f'{cls.__name__} made no SDPA call at {hw}'
    stages = [stage for stage, _ in calls]
    assert stages == sorted(stages) and set(stages) <= set(range(len(model_depths(cls))))
    for stage, call in calls:
        verdicts = sdpa.eligible_backends(call, dtype, sm=(9, 0))
        fused = [name for name in sdpa.FUSED_BACKENDS if verdicts[name].eligible]
        assert fused, (f'{cls.__name__} stage {stage} {call}: only the math kernel '
                       f'({ {n: v.reasons for n, v in verdicts.items()} })')
        for order in (sdpa.priority_order(), sdpa.priority_order(cudnn_deprioritized=True)):
            assert sdpa.predicted_backend(call, dtype, order=order) in sdpa.FUSED_BACKENDS


def model_depths(cls):
    return cls.arch_zoo[cls.smallest_arch]['depths']


def test_masks_only_where_maps_are_padded(recorded):
    """Window attention passes its padding mask only when a stage pads: at 801x1213 every
    stage does, at 896x896 (a multiple of every family's windows at every stride) none."""
    padded = [c for (_, hw), calls in recorded.items() if hw == (801, 1213) for _, c in calls]
    masked = [c for c in padded if c.mask_shape is not None]
    assert masked, 'no family exercises the masked path'
    for call in masked:
        assert call.mask_dtype == torch.bool
        assert call.mask_shape == (call.q_shape[0], 1, 1, call.k_shape[-2])
    for cls in FUSED_FAMILIES:
        calls = sdpa.record_family_calls(cls, (896, 896), batch=1)
        assert calls and all(c.mask_shape is None for _, c in calls), cls.__name__


@pytest.mark.parametrize('cls', FUSED_FAMILIES, ids=lambda cls: cls.__name__)
def test_meta_recording_equals_a_real_forward(cls):
    """The meta forward (with devices' conv layouts) records exactly the calls of a real CPU
    forward: shapes, strides, storage offsets and masks."""
    meta = sdpa.record_family_calls(cls, (65, 97), batch=2)
    real = sdpa.record_family_calls(cls, (65, 97), batch=2, device='cpu')
    assert meta == [sdpa.RecordedCall(s, dataclasses.replace(c, device='meta'))
                    for s, c in real]


def test_report_and_markdown():
    cls = FUSED_FAMILIES[0]
    rows = sdpa.report([cls], sizes=[(801, 1213)])
    assert {r.dtype for r in rows} == {FP16, BF16}
    assert all(r.eligible and r.predicted in sdpa.FUSED_BACKENDS for r in rows)
    text = sdpa.markdown(rows, sdpa.registered_families())
    assert '### 801x1213, batch 2' in text and cls.__name__ in text
    without = [line for line in text.splitlines() if line.startswith('No SDPA calls')]
    for other in sdpa.registered_families():
        if not other.fused_attention:
            assert other.__name__ in without[0]


def test_materialize_rebuilds_a_recorded_call():
    """The device check replays calls from tensors made to the recorded layout."""
    masked = (c for cls in FUSED_FAMILIES for _, c in sdpa.record_family_calls(cls, (65, 97), 1)
              if c.mask_shape is not None)
    call = next(masked)  # a padded window: q/k/v are views into one qkv tensor
    q, k, v, mask = sdpa.materialize(call, FP32, device='cpu')
    for t, shape, stride, offset in zip((q, k, v), (call.q_shape, call.k_shape, call.v_shape),
                                        (call.q_stride, call.k_stride, call.v_stride),
                                        call.storage_offsets):
        assert (t.shape, t.stride(), t.storage_offset()) == (shape, stride, offset)
    assert (mask.shape, mask.stride(), mask.dtype) == (call.mask_shape, call.mask_stride,
                                                       call.mask_dtype)
    assert mask.any(-1).all()  # every query keeps a key
