"""Which CUDA kernel ``F.scaled_dot_product_attention`` takes for each attention call, on the CPU.

On a CUDA device, SDPA chooses one of four backends per call: FlashAttention-2 (``flash``),
the CUTLASS memory-efficient kernel (``efficient``), cuDNN's fused attention (``cudnn``), or
the explicit ``math`` fallback, which materialises the ``(N_q, N_k)`` matrix. The choice is a
list of filters per backend and a priority order; this module re-states those filters as pure
functions of an :class:`~mmhat.models.layers.AttentionCall`, so the kernel of every call of
every family can be predicted without a GPU, and checked on one later
(:func:`check_on_device`).

The rules are PyTorch's, read from:

* ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`` at main-branch commit
  ``001f694a``, a 2026 snapshot (it has the CUDA-13 / cuDNN-9.15.1 preference of
  pytorch#171627 and is, if anything, newer than 2.11): ``can_use_flash_attention``,
  ``can_use_mem_efficient_attention``, ``can_use_cudnn_attention``, ``priority_order`` and
  ``select_sdp_backend``;
* ``aten/src/ATen/native/transformers/sdp_utils_cpp.h`` as shipped in the torch 2.13.0 wheel
  (the shared filters: ``check_tensor_shapes``, ``check_attn_mask_shape``,
  ``check_batch_size_and_num_heads_dense``, ``check_last_dim_stride_equals_1_dense`` ...);
* ``aten/src/ATen/native/transformers/attention.cpp`` (``validate_sdpa_input``, what each
  backend does to a mask before its kernel) and the memory-efficient kernel's own argument
  checks in ``cuda/attention.cu`` (``invalid dtype for bias``).

These are the rules of that PyTorch generation (2.10 and later); the checks that decide
mmhat's calls (dtype, head width, masks, strides) read the same in a 2.4/2.5-era
``sdp_utils.cpp``, the priority order is the part that moves between releases. A prediction
is a prediction: :func:`check_on_device` asks a real GPU's dispatcher
(``torch._fused_sdp_choice``) and runs each kernel.

Entry point: ``python -m mmhat.utils.sdpa`` prints the prediction table of every registered
family (``docs/sdpa_kernels.md``); ``--check-device`` runs the families and their calls on the
CUDA device and compares.
"""
import argparse
import contextlib
import itertools
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Type

import torch
from torch._prims_common import suggest_memory_format
from torch.utils._python_dispatch import TorchDispatchMode

from mmhat import compat
from mmhat.models.layers import AttentionCall, record_attention_calls

#: the fused backends, by mmhat's names (``compat.SDPA_BACKENDS`` maps them to ``SDPBackend``)
FUSED_BACKENDS = ('flash', 'efficient', 'cudnn')
#: ``versionRuntimeCuDNN()`` of the cuDNN that CUDA 13 wheels ship (9.15.1 or newer): the
#: version that turns on ``check_prefer_cudnn_attention`` (``> 91500``)
DEFAULT_CUDNN_VERSION = 91501
#: the CUDA machine the project targets: Hopper H200
DEFAULT_SM = (9, 0)
LOW_PRECISION = (torch.float16, torch.bfloat16)
_SIZES = ((800, 1216), (801, 1213))


@dataclass(frozen=True)
class Eligibility:
    """One backend's verdict on one call.

    Attributes:
        backend: ``'flash'``, ``'efficient'``, ``'cudnn'`` or ``'math'``.
        eligible: every filter of the backend passes (and its kernel accepts the arguments).
        reasons: why not, one per failed check, each naming the PyTorch check it mirrors.
        notes: what the backend does to the call on the way (copies, padding) and what a GPU
            run must confirm.
        fatal: the dispatcher would select the backend but its kernel raises (no fallback).
    """
    backend: str
    eligible: bool
    reasons: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = ()
    fatal: bool = False


class RecordedCall(NamedTuple):
    """An SDPA call of a family's forward and the stage (0-based) that made it."""
    stage: int
    call: AttentionCall


# ---------------------------------------------------------------------------------------
# The checks (each returns None when it passes, else the reason)
# ---------------------------------------------------------------------------------------
def _sm_in(sm: Tuple[int, int], low: Tuple[int, int], high: Tuple[int, int]) -> bool:
    """``check_sm_version<low, high>``: inclusive range of compute capabilities."""
    return low <= tuple(sm) <= high


def _check_tensor_shapes(c: AttentionCall) -> Optional[str]:
    dims = {len(c.q_shape), len(c.k_shape), len(c.v_shape)}
    if dims != {4}:
        return (f'check_tensor_shapes: all fused kernels need 4-D q, k, v; got '
                f'{len(c.q_shape)}-D, {len(c.k_shape)}-D, {len(c.v_shape)}-D')
    return None


def _check_nonzero_sequence_lengths(c: AttentionCall) -> Optional[str]:
    if c.q_shape[-2] == 0 or c.k_shape[-2] == 0:
        return 'check_nonzero_sequence_lengths_dense: seq_len_q or seq_len_kv is 0'
    return None


def _check_last_dim_stride(c: AttentionCall, ignore_singleton_dim: bool) -> Optional[str]:
    """``check_last_dim_stride_equals_1_dense``: q/k/v (and, on GPU, the mask) unit-stride
    along the last dim; flash and cuDNN accept any stride when the head dim is 1."""
    unit = all(s[-1] == 1 for s in (c.q_stride, c.k_stride, c.v_stride))
    if ignore_singleton_dim and c.q_shape[-1] == 1:
        unit = True
    mask_unit = c.mask_stride is None or c.mask_stride[-1] == 1
    if unit and mask_unit:
        return None
    got = f'q/k/v stride(-1) {c.q_stride[-1]}, {c.k_stride[-1]}, {c.v_stride[-1]}'
    if c.mask_stride is not None:
        got += f', attn_mask stride(-1) {c.mask_stride[-1]}'
    return f'check_last_dim_stride_equals_1_dense: the last dim must have stride 1 ({got})'


def _check_batch_and_heads(c: AttentionCall, enable_gqa: bool,
                           requires_same_kv_heads: bool) -> Optional[str]:
    """``check_batch_size_and_num_heads_dense<supports_gqa=true, ...>`` (CUDA)."""
    (bq, hq), (bk, hk), (bv, hv) = c.q_shape[:2], c.k_shape[:2], c.v_shape[:2]
    if not bq == bk == bv:
        return (f'check_batch_size_and_num_heads_dense: q, k, v batch sizes differ '
                f'({bq}, {bk}, {bv}); dense inputs are not broadcast')
    if enable_gqa:
        if requires_same_kv_heads and hk != hv:
            return f'check_grouped_query_attention: k and v heads differ ({hk}, {hv})'
        if hq % hk or (not requires_same_kv_heads and hq % hv):
            return (f'check_grouped_query_attention: kv heads ({hk}, {hv}) must divide the '
                    f'{hq} query heads')
        return None
    if not hq == hk == hv:
        return (f'check_batch_size_and_num_heads_dense: q, k, v heads differ ({hq}, {hk}, '
                f'{hv}) and enable_gqa is False')
    return None


def _check_attn_mask_shape(c: AttentionCall) -> Optional[str]:
    """``check_attn_mask_shape`` (cuDNN): 2-D ``(N_q|1, N_k|1)`` or 4-D
    ``(B|1, h|1, N_q|1, N_k|1)``; 3-D masks are refused."""
    if c.mask_shape is None:
        return None
    m, (b, h, nq, _), nk = c.mask_shape, c.q_shape, c.k_shape[-2]
    ok = len(m) >= 2 and m[-2] in (nq, 1) and m[-1] in (nk, 1)
    ok = ok and (len(m) == 2 or (len(m) == 4 and m[0] in (b, 1) and m[1] in (h, 1)))
    if ok:
        return None
    return (f'check_attn_mask_shape: mask {tuple(m)} is neither (N_q|1, N_k|1) nor '
            f'(B|1, h|1, N_q|1, N_k|1) for q {c.q_shape}, k {c.k_shape}')


def minimum_gemm_alignment(dtype: torch.dtype, sm: Tuple[int, int]) -> int:
    """``minimum_gemm_alignment``: elements the memory-efficient kernel needs head dims and
    storage offsets to be multiples of (8 for fp16/bf16, 4 for fp32 on sm80+)."""
    half = dtype in LOW_PRECISION
    tensor_cores = sm[0] >= 8 or (sm[0] >= 7 and half)
    alignment = 4 if sm[0] >= 8 else 1
    if tensor_cores:
        alignment = max(alignment, 128 // (16 if half else 32))
    return alignment


def _check_low_precision(dtype: torch.dtype, sm: Tuple[int, int], check: str) -> List[str]:
    """fp16, and bf16 from sm80 on (flash's and cuDNN's dtype rule, named ``check``)."""
    allowed = LOW_PRECISION if sm[0] >= 8 else (torch.float16, )
    if dtype in allowed:
        return []
    return [f'{check}: {dtype} is not one of {", ".join(map(str, allowed))}']


def _check_mask_dtype(c: AttentionCall, dtype: torch.dtype) -> Optional[str]:
    """``validate_sdpa_input``: a mask is bool, float32 or q's dtype; SDPA raises otherwise."""
    if c.mask_dtype is None or c.mask_dtype in (torch.bool, torch.float32, dtype):
        return None
    return (f'validate_sdpa_input: attn_mask dtype {c.mask_dtype} is neither bool, float32 '
            f'nor q dtype {dtype} (SDPA raises on every backend)')


# ---------------------------------------------------------------------------------------
# The backends
# ---------------------------------------------------------------------------------------
def _flash(c: AttentionCall, dtype: torch.dtype, sm: Tuple[int, int], training: bool,
           dropout_p: float, is_causal: bool, enable_gqa: bool) -> Eligibility:
    """``can_use_flash_attention`` (general constraints, then the dense ones)."""
    reasons, notes = [], []
    shapes = _check_tensor_shapes(c)
    if shapes:
        return Eligibility('flash', False, (shapes,))
    if c.mask_shape is not None:
        reasons.append('check_for_attn_mask: Flash Attention does not support a non-null '
                       'attn_mask')
    dq, dk, dv = c.q_shape[-1], c.k_shape[-1], c.v_shape[-1]
    if not (dq == dk == dv and dq <= 256):
        reasons.append(f'check_head_dim_size_flash: q, k, v head dims must be equal and '
                       f'<= 256, got {dq}, {dk}, {dv}')
    if not _sm_in(sm, (8, 0), (12, 1)):
        reasons.append(f'check_flash_attention_hardware_support: sm{sm[0]}{sm[1]} is outside '
                       f'[sm80, sm121]')
    if training and (_sm_in(sm, (8, 6), (8, 9)) or _sm_in(sm, (12, 0), (12, 1))):
        if not (dq <= 192 or (dropout_p == 0 and dq > 224)):
            reasons.append(f'check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_'
                           f'or_120: no training with head dim {dq} on sm{sm[0]}{sm[1]}')
    if is_causal and c.q_shape[-2] != c.k_shape[-2]:
        reasons.append('check_flash_causal_non_square_seqlens: is_causal needs '
                       'seq_len_q == seq_len_kv')
    reasons += _check_low_precision(dtype, sm, 'check_dtypes_flash_attention')
    for reason in (_check_batch_and_heads(c, enable_gqa, requires_same_kv_heads=True),
                   _check_nonzero_sequence_lengths(c),
                   _check_last_dim_stride(c, ignore_singleton_dim=True)):
        if reason:
            reasons.append(reason)
    if dq % 8:
        notes.append(f'head dim {dq} is zero-padded to a multiple of 8 around the kernel '
                     f'(attention.cpp pad_last_dim<8>): a copy of q, k, v')
    return Eligibility('flash', not reasons, tuple(reasons), tuple(notes))


def _efficient(c: AttentionCall, dtype: torch.dtype, sm: Tuple[int, int], training: bool,
               dropout_p: float, is_causal: bool, enable_gqa: bool) -> Eligibility:
    """``can_use_mem_efficient_attention`` (CUDA, not ROCm), then the kernel's own checks."""
    reasons, notes = [], []
    if not _sm_in(sm, (5, 0), (12, 1)):
        reasons.append(f'check_mem_efficient_hardware_support: sm{sm[0]}{sm[1]} is outside '
                       f'[sm50, sm121]')
    shapes = _check_tensor_shapes(c)
    if shapes:
        return Eligibility('efficient', False, tuple(reasons) + (shapes, ))
    align = minimum_gemm_alignment(dtype, sm)
    dq, dk, dv = c.q_shape[-1], c.k_shape[-1], c.v_shape[-1]
    if not (dq == dk and dq > 0 and dv > 0 and dq % align == 0 and dv % align == 0):
        reasons.append(f'check_head_dim_size_mem_efficient: q/k head dims must be equal and '
                       f'q, v head dims multiples of {align} for {dtype}, got {dq}, {dk}, {dv}')
    if sm[0] >= 8:
        offsets = c.storage_offsets
        if any(o % align for o in offsets):
            reasons.append(f'check_data_ptr_alignment_mem_efficient: q, k, v storage offsets '
                           f'{offsets} must be multiples of {align} elements on sm80+')
    for reason in (_check_nonzero_sequence_lengths(c),
                   _check_last_dim_stride(c, ignore_singleton_dim=False),
                   _check_batch_and_heads(c, enable_gqa, requires_same_kv_heads=True)):
        if reason:
            reasons.append(reason)
    allowed = ((torch.float16, torch.float32, torch.bfloat16) if sm[0] >= 8 else
               (torch.float16, torch.float32))
    if dtype not in allowed:
        reasons.append(f'check_tensor_dtype (mem-efficient): {dtype} is not one of '
                       f'{", ".join(map(str, allowed))}')
    fatal = False
    if c.mask_dtype is not None and c.mask_dtype not in (torch.bool, dtype):
        # attention.cu _efficient_attention_forward: TORCH_CHECK(bias dtype == query dtype),
        # after the dispatcher has chosen this backend, so SDPA raises instead of falling back.
        fatal = not reasons
        reasons.append(f'_efficient_attention_forward: invalid dtype for bias - a float mask '
                       f'must be {dtype}, got {c.mask_dtype} (the dispatcher does not check '
                       f'it: SDPA raises)')
    elif c.mask_shape is not None:
        notes.append('the mask becomes an additive bias in q dtype (bool -> 0 / -inf), its '
                     'last dim padded to a multiple of 8 when its strides are not '
                     '(attention.cpp preprocess_mask), then expanded to (B, h, N_q, N_k)')
    return Eligibility('efficient', not reasons, tuple(reasons), tuple(notes), fatal)


def _cudnn_head_dim_limit(c: AttentionCall, sm: Tuple[int, int], cudnn_version: int) -> int:
    """``check_cudnn_tensor_shapes``: 128, or 256 on sm90/sm10x with cuDNN > 9.22 (and a
    cuDNN frontend >= 1.24, assumed), or 192 for the (192, 128) MLA shape from 9.11."""
    sm90_or_10x = (sm[0] == 9 and sm[1] == 0) or sm[0] == 10
    unsupported_sm107 = sm == (10, 7) and cudnn_version <= 92500
    if sm90_or_10x and not unsupported_sm107 and cudnn_version > 92200:
        return 256
    if sm90_or_10x and cudnn_version >= 91100 and (c.q_shape[-1], c.v_shape[-1]) == (192, 128):
        return 192
    return 128


def _cudnn(c: AttentionCall, dtype: torch.dtype, sm: Tuple[int, int], training: bool,
           dropout_p: float, is_causal: bool, enable_gqa: bool, deterministic: bool,
           cudnn_version: int) -> Eligibility:
    """``can_use_cudnn_attention`` (general constraints, then the dense ones)."""
    reasons, notes = [], []
    if dropout_p > 0 and 91100 < cudnn_version < 91400:
        reasons.append(f'can_use_cudnn_attention: cuDNN {cudnn_version} (9.11 - 9.13) has no '
                       f'SDPA dropout')
    shapes = _check_tensor_shapes(c)
    if shapes:
        return Eligibility('cudnn', False, tuple(reasons) + (shapes, ))
    if deterministic:
        reasons.append('check_cudnn_deterministic: cuDNN SDPA is not deterministic '
                       '(torch.use_deterministic_algorithms(True) without warn_only)')
    reasons += _check_low_precision(dtype, sm, 'check_dtypes_low_precision')
    mask_shape = _check_attn_mask_shape(c)
    if mask_shape:
        reasons.append(mask_shape)
    if not _sm_in(sm, (8, 0), (12, 1)):
        reasons.append(f'check_cudnn_hardware_support: sm{sm[0]}{sm[1]} is outside '
                       f'[sm80, sm121]')
    if dropout_p * 16 != int(dropout_p * 16):
        reasons.append('check_cudnn_dropout: dropout must be a multiple of 1/16')
    for reason in (_check_nonzero_sequence_lengths(c),
                   _check_last_dim_stride(c, ignore_singleton_dim=True),
                   _check_batch_and_heads(c, enable_gqa, requires_same_kv_heads=False)):
        if reason:
            reasons.append(reason)
    (b, h, s_q, d_qk), s_k, d_v = c.q_shape, c.k_shape[-2], c.v_shape[-1]
    if b > 65535 or h > 65535:
        reasons.append(f'check_cudnn_tensor_shapes: batch {b} or heads {h} above 65535')
    limit = _cudnn_head_dim_limit(c, sm, cudnn_version)
    if d_qk > limit or d_v > limit:
        reasons.append(f'check_cudnn_tensor_shapes: head dims {d_qk}, {d_v} above {limit}')
    if d_qk % 8 or d_v % 8:
        reasons.append(f'check_cudnn_tensor_shapes: head dims {d_qk}, {d_v} are not '
                       f'multiples of 8')
    if s_k == 1:
        reasons.append('check_cudnn_tensor_shapes: key/value sequence length 1')
    if dropout_p > 0 and s_q == 1:
        reasons.append('check_cudnn_tensor_shapes: query sequence length 1 with dropout')
    if training and limit == 256:
        # check_cudnn_d256_bprop_head_dim: the backward of the d256 generation
        if not ((d_qk <= 128 and d_v <= 128) or (d_qk, d_v) in ((192, 128), (256, 256))):
            reasons.append(f'check_cudnn_d256_bprop_head_dim: no backward for head dims '
                           f'{d_qk}, {d_v}')
    if c.mask_shape is not None:
        notes.append('the mask becomes an additive bias in q dtype (bool -> 0 / -65504, '
                     'convert_boolean_attn_mask_cudnn), expanded to (B, h_mask, N_q, N_k) '
                     'with its own strides: whether cuDNN builds a plan for a bias whose '
                     f'rows are {c.mask_shape[-1]} elements apart is decided by cuDNN at run '
                     'time (an error, not a fallback) - confirm on the GPU')
    return Eligibility('cudnn', not reasons, tuple(reasons), tuple(notes))


def eligible_backends(call: AttentionCall,
                      dtype: Optional[torch.dtype] = None,
                      sm: Tuple[int, int] = DEFAULT_SM,
                      training: bool = False,
                      *,
                      dropout_p: float = 0.0,
                      is_causal: bool = False,
                      enable_gqa: bool = False,
                      deterministic: bool = False,
                      cudnn_version: int = DEFAULT_CUDNN_VERSION) -> Dict[str, Eligibility]:
    """Each SDPA backend's verdict on ``call`` on a CUDA device of compute capability ``sm``.

    The filters are PyTorch's (see the module docstring for the files and version); the
    backends are assumed enabled (``torch.backends.cuda.enable_*_sdp``), the tensors dense
    (not nested) and on the device, and the mask not requiring grad.

    Args:
        call: a recorded call (its shapes, strides, storage offsets and mask).
        dtype: the dtype q, k, v would have (AMP runs); None: the recorded one.
        sm: ``(major, minor)`` compute capability; H200 / H100 are ``(9, 0)``.
        training: q/k/v require grad with grad mode on (``input_requires_grad``).
        dropout_p / is_causal / enable_gqa: the other SDPA arguments (mmhat passes none).
        deterministic: ``torch.use_deterministic_algorithms(True)`` without ``warn_only``.
        cudnn_version: ``torch.backends.cudnn.version()`` of the run.

    Returns:
        ``{'flash': ..., 'efficient': ..., 'cudnn': ..., 'math': ...}`` of :class:`Eligibility`.
    """
    dtype = call.dtype if dtype is None else dtype
    args = (call, dtype, sm, training, dropout_p, is_causal, enable_gqa)
    verdicts = {
        'flash': _flash(*args),
        'efficient': _efficient(*args),
        'cudnn': _cudnn(*args, deterministic, cudnn_version),
        'math': Eligibility('math', True),
    }
    invalid = _check_mask_dtype(call, dtype)
    if invalid:  # raised before any backend is chosen
        verdicts = {name: Eligibility(name, False, (invalid, ) + v.reasons, v.notes, True)
                    for name, v in verdicts.items()}
    return verdicts


def priority_order(sm: Tuple[int, int] = DEFAULT_SM,
                   cudnn_version: int = DEFAULT_CUDNN_VERSION,
                   cuda_version: Tuple[int, int] = (13, 0),
                   cudnn_deprioritized: bool = False) -> Tuple[str, ...]:
    """``priority_order`` / ``check_prefer_cudnn_attention``: the order ``select_sdp_backend``
    tries the backends in.

    The context's default is flash, efficient, math, cuDNN (cuDNN is then never chosen, as
    math always passes); at the first SDPA call it becomes cuDNN, flash, efficient, math when
    cuDNN is preferred: runtime cuDNN newer than 9.15.0, sm9x or sm10x (with CUDA < 13 only
    minors 0 and 3), and ``TORCH_CUDNN_SDPA_DEPRIORITIZED`` unset.
    """
    prefer = (not cudnn_deprioritized and cudnn_version > 91500 and sm[0] in (9, 10)
              and (tuple(cuda_version) >= (13, 0) or sm[1] in (0, 3)))
    return ('cudnn', 'flash', 'efficient', 'math') if prefer else ('flash', 'efficient',
                                                                   'math', 'cudnn')


def predicted_backend(call: AttentionCall,
                      dtype: Optional[torch.dtype] = None,
                      sm: Tuple[int, int] = DEFAULT_SM,
                      training: bool = False,
                      order: Optional[Sequence[str]] = None,
                      **kwargs) -> str:
    """The backend ``select_sdp_backend`` would pick: the first eligible one in ``order``
    (default :func:`priority_order` for ``sm``), or ``'error'`` where the chosen kernel raises.

    ``kwargs`` are :func:`eligible_backends`'s keyword arguments.
    """
    verdicts = eligible_backends(call, dtype, sm, training, **kwargs)
    if order is None:
        order = priority_order(sm, kwargs.get('cudnn_version', DEFAULT_CUDNN_VERSION))
    for name in order:
        if verdicts[name].eligible:
            return name
        if verdicts[name].fatal:
            return 'error'
    return 'error'


# ---------------------------------------------------------------------------------------
# The families' calls
# ---------------------------------------------------------------------------------------
def registered_families() -> List[Type]:
    """:func:`mmhat.models.backbones.registered_families`, imported when first needed (this
    module is imported by the backbones' attention layer)."""
    from mmhat.models.backbones import registered_families as families
    return families()


def record_family_calls(cls: Type,
                        hw: Tuple[int, int] = (800, 1216),
                        batch: int = 2,
                        device: str = 'meta') -> List[RecordedCall]:
    """Run the family's smallest variant once on ``batch`` images of ``hw`` and return the
    SDPA calls it makes, each with its stage.

    On ``'meta'`` tensors nothing is computed, so 800x1216 costs well under a second; the
    convolutions are given the output layout a real device gives them
    (:class:`ConvLayoutAsOnDevice`), so the calls equal those of a CPU forward, strides and
    storage offsets included (``tests/test_sdpa.py`` checks it). A family whose forward
    cannot run on meta tensors runs for real on the CPU (no grad); ``device='cuda'`` records
    a real forward on the GPU. Families without a fused path (``fused_attention = False``)
    make no SDPA call: ``[]``.
    """
    if not cls.fused_attention:
        return []
    devices = [device] if device != 'meta' else ['meta', 'cpu']
    for i, dev in enumerate(devices):
        # built on the CPU (its init draws random numbers), then moved: a failed meta run
        # leaves a model without data, so the fallback builds its own
        model = cls(arch=cls.smallest_arch, fused_attn=True).eval().to(dev)
        try:
            return _record(model, hw, batch, dev)
        except (NotImplementedError, RuntimeError):
            if i == len(devices) - 1:
                raise
    raise AssertionError('unreachable')


class ConvLayoutAsOnDevice(TorchDispatchMode):
    """Meta convolutions return contiguous NCHW maps (meta tensors have no backend to ask,
    see ``meta_conv`` in ``torch/_meta_registrations.py``); oneDNN on the CPU and cuDNN on
    CUDA (``cudnn_conv_suggest_memory_format``, depthwise included) return channels-last
    when the input or the weight is channels-last, as mmhat's weights are. Scoped to one
    recording; it changes strides only."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func is torch.ops.aten.convolution.default and out.dim() == 4
                and any(suggest_memory_format(t) == torch.channels_last for t in args[:2])):
            out = out.contiguous(memory_format=torch.channels_last)
        return out


def _record(model: torch.nn.Module, hw: Tuple[int, int], batch: int,
            device: str) -> List[RecordedCall]:
    starts: List[int] = []  # calls recorded before each stage began
    layout = ConvLayoutAsOnDevice() if device == 'meta' else contextlib.nullcontext()
    with torch.no_grad(), record_attention_calls() as calls:
        hooks = [stage.register_forward_pre_hook(lambda *_: starts.append(len(calls)))
                 for stage in model.stages]
        try:
            x = torch.zeros(batch, model.in_channels, *hw, device=device)
            with layout:
                model(x)
        finally:
            for hook in hooks:
                hook.remove()
    stage_of = [sum(1 for s in starts if s <= j) - 1 for j in range(len(calls))]
    return [RecordedCall(s, c) for s, c in zip(stage_of, calls) if c.fused]


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportRow:
    """One distinct SDPA call of a family at one input size, in one dtype."""
    family: str
    arch: str
    hw: Tuple[int, int]
    batch: int
    stage: int
    count: int
    q_shape: Tuple[int, ...]
    k_shape: Tuple[int, ...]
    head_dim: int
    mask: str
    dtype: torch.dtype
    eligible: Tuple[str, ...]
    predicted: str
    predicted_flash_first: str
    reasons: Dict[str, Tuple[str, ...]]
    notes: Tuple[str, ...]


def mask_kind(call: AttentionCall) -> str:
    """``'none'`` or the mask's dtype and shape, e.g. ``'bool (1976, 1, 1, 64)'``."""
    if call.mask_shape is None:
        return 'none'
    return f'{str(call.mask_dtype).replace("torch.", "")} {tuple(call.mask_shape)}'


def _distinct(recorded: Sequence[RecordedCall]) -> Iterator[Tuple[RecordedCall, int]]:
    """Calls that differ in anything the rules read, in order of first use, with counts."""
    def key(r: RecordedCall) -> tuple:
        c = r.call
        return (r.stage, c.q_shape, c.k_shape, c.v_shape, c.q_stride, c.k_stride, c.v_stride,
                c.storage_offsets, c.mask_shape, c.mask_stride, c.mask_dtype)
    counts: Dict[tuple, int] = {}
    first: Dict[tuple, RecordedCall] = {}
    for r in recorded:
        counts[key(r)] = counts.get(key(r), 0) + 1
        first.setdefault(key(r), r)
    for k, r in first.items():
        yield r, counts[k]


def report(families: Optional[Sequence[Type]] = None,
           sizes: Sequence[Tuple[int, int]] = _SIZES,
           batch: int = 2,
           dtypes: Sequence[torch.dtype] = LOW_PRECISION,
           sm: Tuple[int, int] = DEFAULT_SM,
           training: bool = False,
           cudnn_version: int = DEFAULT_CUDNN_VERSION) -> List[ReportRow]:
    """Rows per (family, size, distinct call) x dtype: eligible kernels and the predicted one.

    ``predicted`` follows :func:`priority_order` for ``sm`` and ``cudnn_version``;
    ``predicted_flash_first`` is the choice without the cuDNN preference (older cuDNN, or
    ``TORCH_CUDNN_SDPA_DEPRIORITIZED=1``).
    """
    rows = []
    order = priority_order(sm, cudnn_version)
    flash_first = priority_order(sm, cudnn_version, cudnn_deprioritized=True)
    for cls, hw in itertools.product(families or registered_families(), sizes):
        for (stage, call), count in _distinct(record_family_calls(cls, hw, batch)):
            for dtype in dtypes:
                kw = dict(cudnn_version=cudnn_version)
                verdicts = eligible_backends(call, dtype, sm, training, **kw)
                rows.append(
                    ReportRow(
                        family=cls.__name__, arch=cls.smallest_arch, hw=tuple(hw), batch=batch,
                        stage=stage, count=count, q_shape=call.q_shape, k_shape=call.k_shape,
                        head_dim=call.q_shape[-1], mask=mask_kind(call), dtype=dtype,
                        eligible=tuple(n for n in FUSED_BACKENDS if verdicts[n].eligible),
                        predicted=predicted_backend(call, dtype, sm, training, order, **kw),
                        predicted_flash_first=predicted_backend(call, dtype, sm, training,
                                                                flash_first, **kw),
                        reasons={n: v.reasons for n, v in verdicts.items() if v.reasons},
                        notes=tuple(n for v in verdicts.values() for n in v.notes)))
    return rows


def markdown(rows: Sequence[ReportRow], families: Optional[Sequence[Type]] = None) -> str:
    """The rows as one markdown table per input size (dtypes with the same verdicts share a
    line), and the families without SDPA."""
    families = families or registered_families()
    dtype_name = {torch.float16: 'fp16', torch.bfloat16: 'bf16', torch.float32: 'fp32'}
    lines = []
    for hw in dict.fromkeys(r.hw for r in rows):
        sized = [r for r in rows if r.hw == hw]
        lines += [f'### {hw[0]}x{hw[1]}, batch {sized[0].batch}', '',
                  '| family (variant) | stage | calls | q (B, h, N_q, d) | N_k | mask | dtype '
                  '| eligible | predicted | flash first |',
                  '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
        merged: Dict[tuple, List[str]] = {}
        for r in sized:
            cells = (f'{r.family} ({r.arch})', r.stage, r.count, tuple(r.q_shape),
                     r.k_shape[-2], r.mask, ', '.join(r.eligible) or 'math only', r.predicted,
                     r.predicted_flash_first)
            merged.setdefault(cells, []).append(dtype_name.get(r.dtype, str(r.dtype)))
        for cells, dtypes in merged.items():
            family, stage, count, q, nk, mask, eligible, predicted, flash_first = cells
            lines.append(f'| {family} | {stage} | {count} | {q} | {nk} | {mask} | '
                         f'{", ".join(dtypes)} | {eligible} | {predicted} | {flash_first} |')
        lines.append('')
    without = [cls.__name__ for cls in families if not cls.fused_attention]
    if without:
        lines.append(f'No SDPA calls (no softmax attention, so no fused path): '
                     f'{", ".join(without)}.')
        lines.append('')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------
# On a CUDA device: ask the real dispatcher
# ---------------------------------------------------------------------------------------
def materialize(call: AttentionCall, dtype: torch.dtype,
                device: str = 'cuda') -> Tuple[torch.Tensor, ...]:
    """Random q, k, v (and the mask) with the call's shapes, strides and storage offsets."""

    def strided(shape, stride, offset, dtype):
        extent = offset + 1 + sum((n - 1) * s for n, s in zip(shape, stride))
        base = torch.randn(extent, device=device).to(dtype)
        return base.as_strided(shape, stride, offset)

    q, k, v = (strided(s, st, o, dtype) for s, st, o in
               zip((call.q_shape, call.k_shape, call.v_shape),
                   (call.q_stride, call.k_stride, call.v_stride), call.storage_offsets))
    mask = None
    if call.mask_shape is not None:
        extent = 1 + sum((n - 1) * s for n, s in zip(call.mask_shape, call.mask_stride))
        flat = torch.ones(extent, dtype=torch.bool, device=device)
        flat[::3] = False  # some keys masked out, never a whole row (every 3rd)
        mask = flat.as_strided(call.mask_shape, call.mask_stride).to(call.mask_dtype)
    return q, k, v, mask


def _layout_key(recorded: Sequence[RecordedCall]) -> List[tuple]:
    return [(r.stage, r.call.q_shape, r.call.k_shape, r.call.v_shape, r.call.q_stride,
             r.call.k_stride, r.call.v_stride, r.call.storage_offsets, r.call.mask_shape,
             r.call.mask_stride, r.call.mask_dtype) for r in recorded]


def check_on_device(families: Optional[Sequence[Type]] = None,
                    sizes: Sequence[Tuple[int, int]] = _SIZES,
                    batch: int = 2,
                    dtypes: Sequence[torch.dtype] = LOW_PRECISION,
                    device: str = 'cuda') -> List[dict]:
    """What a run on ``device`` must confirm, family by family and size by size:

    * ``layout``: the calls of a real forward on the device equal the meta recording
      (shapes, strides, storage offsets, masks);
    * ``forward``: the model runs under autocast in each dtype;
    * per distinct call and dtype: the dispatcher's choice (``torch._fused_sdp_choice``)
      next to :func:`predicted_backend` (CUDA only: the prediction is of the CUDA kernels),
      and each fused backend forced alone (``sdpa_kernel``): ``ok`` with its max abs error
      against the fp32 math backend, or why it refused. On the CPU only the flash kernel
      exists (``tools/gpu_check.py --device cpu`` runs this path so that it cannot rot).
    """
    import torch.nn.functional as F
    names = compat.sdpa_backend_names()
    order = compat.sdpa_priority_order()
    priority = ([names.get(int(i), str(i)) for i in order] if order is not None
                else f'fixed (torch {torch.__version__} does not expose it)')
    cuda = torch.device(device).type == 'cuda'
    sm = torch.cuda.get_device_capability(device) if cuda else None
    cudnn_version = (torch.backends.cudnn.version() or 0) if cuda else 0
    backends = FUSED_BACKENDS if cuda else ('flash', )
    results = []
    for cls, hw in itertools.product(families or registered_families(), sizes):
        if not cls.fused_attention:
            continue
        real = record_family_calls(cls, hw, batch, device=device)
        head = dict(family=cls.__name__, hw=hw,
                    layout=_layout_key(real) == _layout_key(record_family_calls(cls, hw, batch)))
        model = cls(arch=cls.smallest_arch, fused_attn=True).eval().to(device)
        for dtype in dtypes:
            try:
                with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=dtype):
                    model(torch.randn(batch, 3, *hw, device=device))
                head[f'forward {dtype}'] = 'ok'
            except RuntimeError as e:
                head[f'forward {dtype}'] = str(e).splitlines()[0][:120]
        results.append(head)
        for (stage, call), _ in _distinct(real):
            for dtype in dtypes:
                q, k, v, mask = materialize(call, dtype, device)
                chosen = torch._fused_sdp_choice(q, k, v, mask, scale=call.scale)
                row = dict(family=cls.__name__, hw=hw, stage=stage, q_shape=call.q_shape,
                           n_k=call.k_shape[-2], mask=mask_kind(call), dtype=dtype,
                           chosen=names.get(int(chosen), str(chosen)),
                           predicted=predicted_backend(call, dtype, sm,
                                                       cudnn_version=cudnn_version)
                           if cuda else None,
                           priority=priority)
                with compat.sdpa_kernel('math'):
                    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                         attn_mask=mask, scale=call.scale)
                for name in backends:
                    try:
                        with compat.sdpa_kernel(name):
                            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                 scale=call.scale)
                        row[name] = f'ok {(out.float() - ref).abs().max().item():.1e}'
                    except RuntimeError as e:
                        row[name] = 'refused: ' + str(e).splitlines()[0][:100]
                results.append(row)
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog='python -m mmhat.utils.sdpa',
        description='Print the predicted CUDA SDPA kernel of every attention call of every '
        'family (markdown), or check the prediction on the CUDA device.')
    parser.add_argument('--sizes', nargs='+', default=[f'{h}x{w}' for h, w in _SIZES],
                        help='input sizes HxW (default: %(default)s)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--check-device', action='store_true',
                        help='run the calls on the CUDA device and compare with the prediction')
    args = parser.parse_args(argv)
    sizes = [tuple(int(n) for n in s.lower().split('x')) for s in args.sizes]
    if not args.check_device:
        print(markdown(report(sizes=sizes, batch=args.batch)))
        return
    results = check_on_device(sizes=sizes, batch=args.batch)
    for result in results:
        print(result)
    rows = [r for r in results if 'chosen' in r]
    agree = sum(r['chosen'] == r['predicted'] for r in rows)
    layouts = all(r['layout'] for r in results if 'layout' in r)
    print(f'predicted == chosen for {agree}/{len(rows)} calls; meta layouts match the device: '
          f'{layouts}')


if __name__ == '__main__':
    main()
