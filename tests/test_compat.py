"""mmhat.compat: each fallback for a torch older than the running one means what the newer
API means. The fallbacks are forced here on whatever torch runs the suite, so that `make test`
(torch 2.13) proves them too; `make test-compat` (torch 2.1) runs them for real."""
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmhat import compat
from mmhat.models.layers import attention, ceil_pool2d


@pytest.fixture
def old_torch(monkeypatch):
    """The version checks of compat answer as on torch 2.1."""
    monkeypatch.setattr(compat, 'TORCH_VERSION', (2, 1))


@pytest.fixture
def exporting(monkeypatch):
    """The model runs as under torch.onnx.export."""
    monkeypatch.setattr(torch.onnx, 'is_in_onnx_export', lambda: True)


def test_version_parsing():
    assert compat._parse('2.1.2+cu121') == (2, 1)
    assert compat._parse('2.13.0') == (2, 13)
    assert compat._parse('2.6.0a0+git1234') == (2, 6)
    assert compat.TORCH_VERSION == compat._parse(torch.__version__)


def test_custom_fwd_fallback_casts_under_autocast_only(old_torch):
    seen = []

    def forward(x, boxes, scale=1.0):
        seen.append((x.dtype, boxes.dtype, torch.is_autocast_cpu_enabled()))
        return x * scale

    wrapped = compat.custom_fwd(forward, device_type='cpu', cast_inputs=torch.float32)
    x = torch.ones(2, dtype=torch.bfloat16)
    ints = torch.ones(2, dtype=torch.int64)
    wrapped(x, ints)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = wrapped(x, ints, scale=2.0)
        assert compat.is_autocast_enabled('cpu')
    assert not compat.is_autocast_enabled('cpu')
    # outside autocast: untouched; inside: floats cast, ints kept, autocast off in the call
    assert seen == [(torch.bfloat16, torch.int64, False), (torch.float32, torch.int64, False)]
    assert out.dtype == torch.float32 and out.tolist() == [2.0, 2.0]


def test_grad_scaler_names_what_is_missing(old_torch):
    with pytest.raises(compat.Unsupported, match=r"fp16 loss scaling on 'cpu' needs torch >= 2\.3"):
        compat.grad_scaler('cpu')


def test_sdpa_kernel_selectors():
    with pytest.raises(ValueError, match='unknown SDPA backend'):
        compat.sdpa_kernel('fastest')
    q = torch.randn(1, 2, 5, 4)
    with compat.sdpa_kernel('math'):
        out = F.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
    names = compat.sdpa_backend_names()
    assert {'flash', 'efficient', 'math'} <= set(names.values())
    if not compat.has_sdpa_kernel_selector():
        with pytest.raises(compat.Unsupported, match='cuDNN SDPA backend is not in torch'):
            compat.sdpa_kernel('cudnn')


def test_sdpa_kernel_fallback_of_torch_2_1(monkeypatch):
    """Without ``torch.nn.attention`` the flags of ``torch.backends.cuda.sdp_kernel`` select
    the backend; the cuDNN one does not exist there."""
    monkeypatch.setattr(compat, 'has_sdpa_kernel_selector', lambda: False)
    with pytest.raises(compat.Unsupported, match='cuDNN SDPA backend is not in torch'):
        compat.sdpa_kernel('cudnn')
    if not hasattr(torch.backends.cuda, 'sdp_kernel'):  # removed from a later torch
        pytest.skip(f'torch {torch.__version__} has no torch.backends.cuda.sdp_kernel')
    q = torch.randn(1, 2, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # deprecated where the selector exists
        with compat.sdpa_kernel('math'):
            assert torch.backends.cuda.math_sdp_enabled()
            assert not torch.backends.cuda.flash_sdp_enabled()
            out = F.scaled_dot_product_attention(q, q, q)
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on exit
    torch.testing.assert_close(out, attention(q, q, q, q.shape[-1] ** -0.5, fused=False))


def test_autocast_probe_matches_torch():
    assert compat.autocast_supports('cpu', torch.bfloat16)
    if compat.autocast_supports('cpu', torch.float16):
        with compat.autocast('cpu', torch.float16):
            assert torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.float16
    else:  # torch 2.1: bf16 only, said in one line
        with pytest.raises(compat.Unsupported, match='float16 autocast on .cpu. is not available'):
            compat.autocast('cpu', torch.float16)


@pytest.mark.parametrize('scale', [48 ** -0.5, 0.3])
def test_sdpa_scale_folded_for_old_exporters(monkeypatch, exporting, scale):
    monkeypatch.setattr(compat, 'ONNX_SDPA_FLOAT_SCALE', False)
    q, k, v = (torch.randn(2, 3, 7, 48, dtype=torch.float64) for _ in range(3))
    folded, passed = compat.sdpa_scale_for_export(q, scale)
    assert passed is None and not torch.equal(folded, q)
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask[..., 0] = True  # every query sees a key
    explicit = attention(q, k, v, scale, attn_mask=mask, fused=False)
    torch.testing.assert_close(attention(q, k, v, scale, attn_mask=mask, fused=True), explicit,
                               rtol=1e-12, atol=1e-12)


def test_sdpa_scale_untouched_outside_export():
    q = torch.randn(1, 1, 3, 8)
    assert compat.sdpa_scale_for_export(q, 0.5)[1] == 0.5


@pytest.mark.parametrize('hw', [(7, 9), (8, 8), (1, 5), (13, 6)])
@pytest.mark.parametrize('window', [2, 3, 8])
@pytest.mark.parametrize('mode', ['max', 'avg'])
def test_ceil_pool_export_form_equals_ceil_mode(monkeypatch, hw, window, mode):
    x = torch.randn(2, 3, *hw, dtype=torch.float64) - 5  # negative: padding must not win
    eager = ceil_pool2d(x, window, mode)
    pool = F.max_pool2d if mode == 'max' else F.avg_pool2d
    torch.testing.assert_close(eager, pool(x, window, window, ceil_mode=True), rtol=0, atol=0)
    monkeypatch.setattr(torch.onnx, 'is_in_onnx_export', lambda: True)
    exported = ceil_pool2d(x, window, mode)
    assert exported.shape == eager.shape == (2, 3, -(-hw[0] // window), -(-hw[1] // window))
    torch.testing.assert_close(exported, eager, rtol=1e-12, atol=1e-12)


def test_ceil_pool_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be 'max' or 'avg'"):
        ceil_pool2d(torch.ones(1, 1, 4, 4), 2, 'min')


def test_restricted_unpickler_admits_numpy_under_either_module_name(tmp_path):
    """numpy 2 pickles ``numpy._core.multiarray``, numpy 1 ``numpy.core.multiarray``: a
    checkpoint written under one loads under the other."""
    from mmhat.checkpoint import _safe_global_types
    module = compat.restricted_pickle_module(_safe_global_types())
    array = np.arange(3)
    unpickler = module.Unpickler(io.BytesIO(b''))
    for name in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        found = unpickler.find_class(name, '_reconstruct')
        assert type(found(np.ndarray, (0, ), b'b')) is np.ndarray
    with pytest.raises(pickle.UnpicklingError, match='GLOBAL builtins.eval is not on the allow'):
        unpickler.find_class('builtins', 'eval')
    torch.save({'a': array}, tmp_path / 'n.pth')
    loaded = torch.load(tmp_path / 'n.pth', weights_only=False, pickle_module=module)
    assert loaded['a'].tolist() == [0, 1, 2]


def test_onnx_export_kwargs_pick_the_torchscript_exporter():
    import inspect
    kwargs = compat.onnx_export_kwargs()
    has_dynamo = 'dynamo' in inspect.signature(torch.onnx.export).parameters
    assert kwargs == ({'dynamo': False} if has_dynamo else {})


def test_is_compiling_is_false_in_eager_code():
    from mmhat import compat
    assert compat.is_compiling() is False
