"""What differs between the torch versions mmhat supports (2.1 to 2.13), in one place.

Every use of a torch API that is newer than torch 2.1 goes through this module, with a
fallback of the same meaning; where a feature cannot exist on an older torch the function
says so in one line (:class:`Unsupported`) instead of failing deep inside torch.

=========================================  ===========  ===================================
feature                                    since torch  before that
=========================================  ===========  ===================================
``torch.serialization.safe_globals``       2.5          :func:`load_restricted`: a pickle
(scoped weights_only allow-list)                        unpickler that admits only listed
                                                        globals (same refusals)
``torch.load`` default ``weights_only``    2.6          ``False``: callers must not rely on
                                                        the default (mmhat never does)
``torch.is_autocast_enabled(device)``      2.4          ``is_autocast_cpu_enabled()``
``torch.amp.custom_fwd(device_type=)``     2.4          :func:`custom_fwd`'s own cast
fp16 autocast on the CPU                   probed       :class:`Unsupported` (torch 2.1:
                                                        bf16 only)
``torch.amp.GradScaler(device)``           2.3          ``torch.cuda.amp.GradScaler``; none
                                                        for the CPU (:class:`Unsupported`)
``torch.nn.attention.sdpa_kernel``         probed       ``torch.backends.cuda.sdp_kernel``
                                                        (flash, efficient, math; no cuDNN)
``torch.onnx.export(dynamo=...)``          2.5          the TorchScript exporter only
ONNX export of SDPA's float ``scale``      2.5          :func:`sdpa_scale_for_export`
``torch._C._get_sdp_priority_order``       probed       ``None`` (the order is fixed)
=========================================  ===========  ===================================
"""
import _compat_pickle
import codecs
import collections
import functools
import inspect
import pickle
import types
import warnings
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch


class Unsupported(RuntimeError):
    """A feature this torch does not have; the message names the torch it needs."""


def _parse(version: str) -> Tuple[int, int]:
    major, minor = version.split('+')[0].split('.')[:2]
    return int(major), int(''.join(c for c in minor if c.isdigit()) or 0)


#: ``(major, minor)`` of the running torch.
TORCH_VERSION: Tuple[int, int] = _parse(torch.__version__)


def torch_at_least(major: int, minor: int) -> bool:
    return TORCH_VERSION >= (major, minor)


# ---------------------------------------------------------------------------------------
# Checkpoint loading
# ---------------------------------------------------------------------------------------
#: torch keeps a scoped allow-list for ``weights_only`` loading (``safe_globals``).
HAS_SAFE_GLOBALS: bool = all(hasattr(torch.serialization, name)
                             for name in ('safe_globals', 'get_safe_globals'))
#: ``torch.load`` refuses pickled objects by default (``weights_only=True``).
WEIGHTS_ONLY_BY_DEFAULT: bool = torch_at_least(2, 6)


def safe_globals_list() -> list:
    """torch's current ``weights_only`` allow-list additions ([] where torch has none)."""
    return list(torch.serialization.get_safe_globals()) if HAS_SAFE_GLOBALS else []


def _torch_tensor_globals() -> Dict[str, Any]:
    """The globals a plain tensor checkpoint pickles on every torch of the range: what
    ``weights_only=True`` admits without an allow-list (rebuild functions, tensor and
    storage classes, dtypes, ``Size``, ``OrderedDict``), by their pickled names."""
    found: Dict[str, Any] = {'collections.OrderedDict': collections.OrderedDict,
                             'collections.Counter': collections.Counter,
                             'builtins.set': set, 'builtins.frozenset': frozenset,
                             'builtins.complex': complex, 'builtins.bytearray': bytearray,
                             # bytes under pickle protocol 2 (torch.save's default)
                             '_codecs.encode': codecs.encode,
                             'torch.Size': torch.Size, 'torch.Tensor': torch.Tensor,
                             'torch.device': torch.device,
                             'torch.nn.parameter.Parameter': torch.nn.Parameter}
    for owner, names in ((torch._utils, ('_rebuild_parameter', '_rebuild_parameter_with_state',
                                         '_rebuild_tensor', '_rebuild_tensor_v2',
                                         '_rebuild_tensor_v3', '_rebuild_sparse_tensor',
                                         '_rebuild_qtensor',
                                         '_rebuild_device_tensor_from_numpy',
                                         '_rebuild_meta_tensor_no_storage',
                                         '_rebuild_nested_tensor', '_rebuild_wrapper_subclass')),
                         (torch._tensor, ('_rebuild_from_type_v2', )),
                         (torch.serialization, ('_get_layout', ))):
        for name in names:
            if hasattr(owner, name):
                found[f'{owner.__name__}.{name}'] = getattr(owner, name)
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)):
            found[f'torch.{name}'] = value
    for cls in list(torch._tensor_classes) + list(torch._storage_classes):
        found[f'{cls.__module__}.{cls.__name__}'] = cls
    return found


def _qualified(obj: Any) -> str:
    return f'{obj.__module__}.{obj.__qualname__}'


def restricted_pickle_module(allowed: Iterable[Any]) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` whose unpickler resolves only the globals of a
    tensor checkpoint and ``allowed`` (classes or functions), and refuses any other with
    ``pickle.UnpicklingError`` before it is imported, so that nothing in the file runs."""
    table = _torch_tensor_globals()
    for obj in allowed:
        name = _qualified(obj)
        table[name] = obj
        # numpy 2 renamed numpy.core to numpy._core: files of either numpy name either one
        for old, new in (('numpy.core.', 'numpy._core.'), ('numpy._core.', 'numpy.core.')):
            if name.startswith(old):
                table.setdefault(new + name[len(old):], obj)

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            # protocol 2 (torch.save's default) writes Python 2 names: __builtin__.set, ...
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            else:
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            try:
                return table[f'{module}.{name}']
            except KeyError:
                raise pickle.UnpicklingError(
                    f'Unsupported global: GLOBAL {module}.{name} is not on the allow-list of '
                    f'tensors and known checkpoint metadata') from None

    def load(file, **kwargs) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()

    module = types.ModuleType('mmhat_restricted_pickle')
    module.Unpickler = RestrictedUnpickler
    module.load = load
    module.UnpicklingError = pickle.UnpicklingError
    return module


def load_restricted(f, map_location: Any = 'cpu', allowed: Iterable[Any] = ()) -> Any:
    """``torch.load`` that admits tensors and ``allowed`` only, on every torch of the range.

    torch >= 2.5: ``weights_only=True`` inside ``safe_globals(allowed)``. Before: torch's
    ``weights_only`` list cannot be extended, so the file is read with
    :func:`restricted_pickle_module` (``weights_only=False`` with a pickle module that
    refuses every other global). Both raise ``pickle.UnpicklingError`` on a refused global.
    """
    allowed = list(allowed)
    if HAS_SAFE_GLOBALS:
        with torch.serialization.safe_globals(allowed):
            return torch.load(f, map_location=map_location, weights_only=True)
    return torch.load(f, map_location=map_location, weights_only=False,
                      pickle_module=restricted_pickle_module(allowed))


# ---------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------
def is_compiling() -> bool:
    """Whether dynamo is tracing the code that calls this (``torch.compiler.is_compiling``,
    torch >= 2.3; ``torch._dynamo.is_compiling`` before)."""
    compiler = getattr(torch, 'compiler', None)
    if compiler is not None and hasattr(compiler, 'is_compiling'):
        return compiler.is_compiling()
    from torch import _dynamo  # torch 2.1-2.2
    return _dynamo.is_compiling()


# ---------------------------------------------------------------------------------------
# Autocast
# ---------------------------------------------------------------------------------------
def is_autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)`` (torch >= 2.4) on every torch."""
    if torch_at_least(2, 4):
        return torch.is_autocast_enabled(device_type)
    if device_type == 'cpu':
        return torch.is_autocast_cpu_enabled()
    if device_type == 'cuda':
        return torch.is_autocast_enabled()
    raise Unsupported(f'autocast state of {device_type!r} needs torch >= 2.4')


@functools.lru_cache(maxsize=None)
def autocast_supports(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.autocast(device_type, dtype=dtype)`` runs on this torch, probed (CPU
    autocast of torch 2.1 takes bfloat16 only and raises for fp16)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # some versions only warn and disable autocast
            with torch.autocast(device_type, dtype=dtype):
                return is_autocast_enabled(device_type)
    except (RuntimeError, UserWarning):
        return False


def autocast(device_type: str, dtype: torch.dtype):
    """``torch.autocast(device_type, dtype=dtype)``, or :class:`Unsupported` in one line
    where this torch has no such autocast (fp16 on the CPU of torch 2.1)."""
    if not autocast_supports(device_type, dtype):
        raise Unsupported(f'{str(dtype).replace("torch.", "")} autocast on {device_type!r} is '
                          f'not available in torch {torch.__version__}')
    return torch.autocast(device_type, dtype=dtype)


def _cast(value: Any, device_type: str, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        floating = value.is_floating_point() and value.device.type == device_type
        return value.to(dtype) if floating else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, device_type, dtype) for k, v in value.items()}
    return value


def custom_fwd(fwd: Callable, *, device_type: str, cast_inputs: torch.dtype) -> Callable:
    """``torch.amp.custom_fwd(fwd, device_type=..., cast_inputs=...)``: under autocast on
    ``device_type``, run ``fwd`` with autocast off and its floating inputs on that device
    cast to ``cast_inputs``. torch < 2.4 has it for CUDA only; the same is done here."""
    if torch_at_least(2, 4):
        return torch.amp.custom_fwd(fwd, device_type=device_type, cast_inputs=cast_inputs)

    @functools.wraps(fwd)
    def forward(*args, **kwargs):
        if not is_autocast_enabled(device_type):
            return fwd(*args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return fwd(*_cast(args, device_type, cast_inputs),
                       **_cast(kwargs, device_type, cast_inputs))
    return forward


def grad_scaler(device_type: str):
    """``torch.amp.GradScaler(device_type)`` (torch >= 2.3); ``torch.cuda.amp.GradScaler``
    before, which has no CPU counterpart."""
    if torch_at_least(2, 3):
        return torch.amp.GradScaler(device_type)
    if device_type == 'cuda':
        return torch.cuda.amp.GradScaler()
    raise Unsupported(f'fp16 loss scaling on {device_type!r} needs torch >= 2.3 '
                      f'(torch {torch.__version__} has a CUDA GradScaler only): use bf16')


# ---------------------------------------------------------------------------------------
# Scaled dot-product attention
# ---------------------------------------------------------------------------------------
#: SDPA backends by mmhat's names -> their ``torch.nn.attention.SDPBackend`` members.
SDPA_BACKENDS = {'flash': 'FLASH_ATTENTION', 'efficient': 'EFFICIENT_ATTENTION',
                 'cudnn': 'CUDNN_ATTENTION', 'math': 'MATH'}


def has_sdpa_kernel_selector() -> bool:
    """``torch.nn.attention.sdpa_kernel`` exists (not in torch 2.1)."""
    try:
        from torch.nn.attention import sdpa_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def sdpa_kernel(name: str):
    """A context in which SDPA may use backend ``name`` only (``'flash'``, ``'efficient'``,
    ``'cudnn'``, ``'math'``). Without it (torch 2.1): ``torch.backends.cuda.sdp_kernel`` with
    one flag on, which has no cuDNN backend (:class:`Unsupported`)."""
    if name not in SDPA_BACKENDS:
        raise ValueError(f'unknown SDPA backend {name!r}; expected one of {sorted(SDPA_BACKENDS)}')
    if has_sdpa_kernel_selector():
        from torch.nn.attention import SDPBackend, sdpa_kernel as select
        if not hasattr(SDPBackend, SDPA_BACKENDS[name]):
            raise Unsupported(f'SDPA backend {name!r} needs a newer torch than '
                              f'{torch.__version__}')
        return select(getattr(SDPBackend, SDPA_BACKENDS[name]))
    if name == 'cudnn':
        raise Unsupported(f'the cuDNN SDPA backend is not in torch {torch.__version__}')
    return torch.backends.cuda.sdp_kernel(enable_flash=name == 'flash',
                                          enable_mem_efficient=name == 'efficient',
                                          enable_math=name == 'math')


def sdpa_backend_names() -> Dict[int, str]:
    """``int(SDPBackend member)`` -> mmhat's name, for the members this torch has (what
    ``torch._fused_sdp_choice`` returns); the enum is ``torch.backends.cuda.SDPBackend``
    in torch 2.1."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        SDPBackend = torch.backends.cuda.SDPBackend
    members = dict(SDPA_BACKENDS, error='ERROR')
    return {int(getattr(SDPBackend, member)): ours for ours, member in members.items()
            if hasattr(SDPBackend, member)}


def sdpa_priority_order() -> Optional[list]:
    """The dispatcher's backend order (``torch._C._get_sdp_priority_order``), or ``None``
    where it is fixed and not exposed (torch 2.1)."""
    getter = getattr(torch._C, '_get_sdp_priority_order', None)
    return list(getter()) if getter is not None else None


# ---------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------
#: the TorchScript ONNX exporter takes SDPA's ``scale`` as a float (pytorch#125158, fixed in
#: torch 2.5: before, ``Sqrt`` of a Python float fails while exporting)
ONNX_SDPA_FLOAT_SCALE: bool = torch_at_least(2, 5)


def sdpa_scale_for_export(q: torch.Tensor, scale: float) -> Tuple[torch.Tensor, Optional[float]]:
    """``(q, scale)`` to pass to SDPA. While exporting to ONNX on torch < 2.5, whose exporter
    cannot take a float ``scale``: q times ``scale * sqrt(d)`` and ``None`` (SDPA's default
    ``1/sqrt(d)``), the same logits up to rounding. Everywhere else unchanged."""
    if ONNX_SDPA_FLOAT_SCALE or not torch.onnx.is_in_onnx_export():
        return q, scale
    return q * (scale * q.shape[-1] ** 0.5), None  # (..., N_q, d)


def onnx_export_kwargs() -> Dict[str, Any]:
    """Extra ``torch.onnx.export`` arguments that pick the TorchScript exporter: ``dynamo=False``
    where the argument exists (torch >= 2.5; its default flips to the dynamo exporter in
    later releases), nothing before (the TorchScript exporter is the only one)."""
    return ({'dynamo': False} if 'dynamo' in inspect.signature(torch.onnx.export).parameters
            else {})
