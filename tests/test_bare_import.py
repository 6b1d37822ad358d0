"""The backbones need torch, mmengine and mmcv's Python code, nothing compiled and no detector.

A machine with a CUDA torch but without a compiled mmcv (a GPU box without network, given
only the pure wheels of ``tools/pack_gpu_deps.sh``; ``docs/gpu_setup.md``) must still build,
train and load every family. Here that is a tested property instead of an accident: the
exercise below runs in a fresh interpreter behind an import blocker (a ``sys.meta_path``
finder that refuses ``mmcv.ops``, ``mmcv._ext``, ``mmdet``, ``mmseg``, ``timm``,
``torchvision`` and their submodules) and, for every registered family's smallest variant,

* builds it through ``mmhat.registry.MODELS`` as ``type='mmhat.<Class>'``,
* loads the stand-in official checkpoint (``{'model': ...}``, ``tests/reference.py``) from a
  local file and checks that every tensor arrived, converted, bit for bit (equality with the
  official outputs is ``test_backbones/test_contract.py``'s),
* trains one step at an odd size (33x47) with and without ``with_cp``: shapes, finite
  values, a gradient for every parameter, equal gradients on both paths,

and reports which modules it imported, from where. Nothing blocked may be imported.

Run as a script it does the exercise in its own process (the blocker goes in first) and prints
the report as JSON::

    PYTHONPATH=.gpu_site:. python tests/test_bare_import.py [--device cuda]

``test_gpu_pack_is_complete`` (slow, needs the package index) builds the pack with the
script, installs it with ``pip --no-index --no-deps --target`` and runs the exercise against
it: mmengine and mmcv must then come from the pack, and every other third-party module that
is imported must be one that a machine with torch, numpy, OpenCV, matplotlib and PyYAML has.
"""
import importlib.abc
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / 'tests'
PACK_SCRIPT = ROOT / 'tools' / 'pack_gpu_deps.sh'

#: what the backbones must not need: compiled mmcv, the detector/segmentor libraries, and
#: the vision libraries the GPU machine happens to have (our code must not lean on them)
BLOCKED = ('mmcv.ops', 'mmcv._ext', 'mmdet', 'mmseg', 'timm', 'torchvision')

#: top-level modules the target machine brings itself (torch and its dependencies, numpy,
#: OpenCV, matplotlib and its dependencies; PyYAML and tqdm through timm, which torch imports
#: when present): everything else that the exercise imports must come from the pack or the
#: checkout
MACHINE_PROVIDES = frozenset({
    'torch', 'torchgen', 'functorch', 'numpy', 'cv2', 'yaml', '_yaml', 'PIL', 'packaging',
    'matplotlib', 'mpl_toolkits', 'contourpy', 'cycler', 'fontTools', 'kiwisolver',
    'pyparsing', 'dateutil', 'six', 'typing_extensions', 'sympy', 'mpmath', 'networkx',
    'jinja2', 'markupsafe', 'filelock', 'fsspec', 'setuptools', 'pkg_resources',
    '_distutils_hack', 'triton', 'nvidia', 'cuda', 'tqdm',
    # torch 2.1 imports these by itself where they are installed (its ONNX and dynamo
    # back ends: onnx, onnxruntime, protobuf's google, ml_dtypes), and a module that
    # torch.distributed writes at run time
    'onnx', 'onnxruntime', 'google', 'ml_dtypes', '_remote_module_non_scriptable',
})

#: the input of the training step: odd on both sides, batch 2 for BatchNorm statistics
TRAIN_SIZE = (2, 3, 33, 47)


class ImportBlocker(importlib.abc.MetaPathFinder):
    """Refuses ``blocked`` packages and their submodules, remembering every attempt."""

    def __init__(self, blocked=BLOCKED):
        self.blocked = tuple(blocked)
        self.attempts = []

    def matches(self, name: str) -> bool:
        return any(name == b or name.startswith(b + '.') for b in self.blocked)

    def find_spec(self, fullname, path=None, target=None):
        if self.matches(fullname):
            self.attempts.append(fullname)
            raise ModuleNotFoundError(f'{fullname} is blocked: the backbones must run without '
                                      f'compiled mmcv ops, mmdet, mmseg, timm and torchvision',
                                      name=fullname)
        return None


def _origin(name: str) -> str:
    """The folder a top-level module was loaded from (``''`` for built-ins)."""
    module = sys.modules.get(name)
    file = getattr(module, '__file__', None)
    if file is None:
        paths = list(getattr(module, '__path__', []) or [])
        return str(Path(paths[0]).parent) if paths else ''
    path = Path(file)
    return str(path.parent.parent if path.name == '__init__.py' else path.parent)


def exercise(device: str = 'cpu') -> dict:
    """Build, load and train every registered family; the report as a dict.

    Call it in a fresh interpreter after :class:`ImportBlocker` is installed (``main``).
    """
    import torch

    import mmcv
    import mmengine
    import mmhat.models  # noqa: F401  registers the families
    import reference as R
    from mmhat.models.backbones.base import PyramidBackbone
    from mmhat.registry import MODELS

    families = sorted((name, cls) for name, cls in MODELS.module_dict.items()
                      if isinstance(cls, type) and issubclass(cls, PyramidBackbone))
    assert families, 'no backbone registered in mmhat.registry.MODELS'
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls in families:
            start = time.perf_counter()
            ref = f'{cls.reference_name}-{cls.smallest_arch}'
            path = R.write_official_checkpoint(ref, Path(tmp) / f'{ref}.pth')
            cfg = dict(type=f'mmhat.{name}', arch=cls.smallest_arch,
                       init_cfg=dict(type='Pretrained', checkpoint=str(path)))
            model = MODELS.build(cfg)
            assert type(model) is cls, f'{cfg["type"]} built {type(model).__name__}'
            model.init_weights()
            # every tensor of the file arrived, converted, bit for bit
            expected = cls.convert_checkpoint(torch.load(path)['model']).state_dict
            loaded = model.state_dict()
            assert loaded.keys() == expected.keys(), f'{name}: loaded keys differ'
            for key, value in expected.items():
                assert torch.equal(loaded[key], value), f'{name}: {key} not loaded'
            # one training step from those weights, plain and with activation checkpointing
            model = model.to(device).train()
            cp = MODELS.build(dict(type=f'mmhat.{name}', arch=cls.smallest_arch, with_cp=True))
            cp.load_state_dict(model.state_dict())
            cp = cp.to(device).train()
            x = torch.randn(*TRAIN_SIZE, generator=torch.Generator().manual_seed(0)).to(device)
            grads = []
            for m in (model, cp):
                outs = m(x)
                B, _, H, W = x.shape
                shapes = [tuple(o.shape) for o in outs]
                assert shapes == [(B, c, cls.stage_size(H, i), cls.stage_size(W, i))
                                  for i, c in zip(m.out_indices, m.out_channels)], shapes
                assert all(torch.isfinite(o).all() for o in outs), f'{name}: non-finite'
                sum(o.square().mean() for o in outs).backward()
                grads.append({n: p.grad for n, p in m.named_parameters()})
            missing = [n for n, g in grads[0].items()
                       if g is None or not torch.isfinite(g).all() or not g.abs().sum() > 0]
            assert not missing, f'{name}: parameters without gradient: {missing[:5]}'
            for n, g in grads[0].items():
                torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-5,
                                           msg=f'{name}: with_cp gradient of {n}')
            report[name] = dict(arch=cls.smallest_arch, tensors_loaded=len(expected),
                                train_shapes=shapes,
                                seconds=round(time.perf_counter() - start, 2))
    return dict(families=report, torch=torch.__version__, mmengine=mmengine.__version__,
                mmcv=mmcv.__version__, python=sys.version.split()[0], device=device)


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    args = parser.parse_args(argv)
    before = set(sys.modules)
    blocker = ImportBlocker()
    sys.meta_path.insert(0, blocker)
    sys.path.insert(0, str(TESTS))  # tests/reference.py
    report = exercise(args.device)
    imported = sorted({name.split('.')[0] for name in set(sys.modules) - before})
    stdlib_dir = sysconfig.get_paths()['stdlib']
    # built-in or stdlib modules, and names of loaded extension internals (cython_runtime)
    origins = {n: _origin(n) for n in imported
               if n not in sys.stdlib_module_names and n not in ('__mp_main__', 'reference')}
    report.update(
        blocked_imported=sorted(n for n in sys.modules if blocker.matches(n)),
        blocked_attempts=sorted(set(blocker.attempts)),
        third_party={n: where for n, where in origins.items()
                     if where and not where.startswith(stdlib_dir)})
    print(json.dumps(report))
    return 0 if not report['blocked_imported'] else 1


# ----------------------------------------------------------------------------- the tests
def run_exercise(pythonpath, timeout=300) -> dict:
    """The exercise in a fresh interpreter with ``pythonpath`` first on its path."""
    paths = [*map(str, pythonpath), *filter(None, [os.environ.get('PYTHONPATH')])]
    env = dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE',
               PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_backbones_run_without_compiled_ops():
    """Every family builds, loads an official file and trains with the blocked modules
    unimportable, and none of them gets imported on the way."""
    from mmhat.models.backbones.base import PyramidBackbone
    from mmhat.registry import MODELS
    report = run_exercise([ROOT])
    registered = {name for name, cls in MODELS.module_dict.items()
                  if isinstance(cls, type) and issubclass(cls, PyramidBackbone)}
    assert set(report['families']) == registered
    assert report['blocked_imported'] == []
    assert 'mmcv' in report['third_party'] and 'mmengine' in report['third_party']


def test_blocker_refuses_submodules_only_of_blocked_names():
    blocker = ImportBlocker()
    assert blocker.matches('mmcv.ops') and blocker.matches('mmcv.ops.nms')
    assert blocker.matches('mmdet') and blocker.matches('mmseg.models')
    assert not blocker.matches('mmcv') and not blocker.matches('mmcv.cnn')
    assert not blocker.matches('mmsegmentation_like') and not blocker.matches('timmy')
    try:
        blocker.find_spec('torchvision.ops')
    except ImportError as e:
        assert 'torchvision.ops is blocked' in str(e)
    else:
        raise AssertionError('torchvision.ops was not refused')


PACK_UNREACHABLE = 3  # pack_gpu_deps.sh's exit status when the index cannot be reached


def _slow(fn):
    """``pytest.mark.slow``, and nothing where pytest is absent (the script mode)."""
    try:
        import pytest
    except ImportError:
        return fn
    return pytest.mark.slow(fn)


@_slow
def test_gpu_pack_is_complete(tmp_path):
    """tools/pack_gpu_deps.sh downloads pure wheels only, they install without an index
    and without dependency resolution, and with them alone (plus what the target machine
    brings) the exercise passes. Downloads about 3 MB; skipped when the index is
    unreachable."""
    import pytest
    wheels, site = tmp_path / 'wheels', tmp_path / 'site'
    env = dict(os.environ, PYTHON=sys.executable)
    pack = subprocess.run(['bash', str(PACK_SCRIPT), str(wheels)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if pack.returncode == PACK_UNREACHABLE:
        pytest.skip(f'package index unreachable: {pack.stderr.strip()[-300:]}')
    assert pack.returncode == 0, (pack.stdout + pack.stderr)[-3000:]
    files = sorted(p.name for p in wheels.glob('*.whl'))
    assert files and all(f.endswith('-none-any.whl') for f in files), files
    # a second run finds everything there and downloads nothing
    again = subprocess.run(['bash', str(PACK_SCRIPT), str(wheels)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and 'nothing to download' in again.stdout, again.stdout
    install = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-index', '--no-deps',
                              '--target', str(site), *map(str, sorted(wheels.glob('*.whl')))],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]

    report = run_exercise([site, ROOT])
    assert report['blocked_imported'] == []
    origins = report['third_party']
    for name in ('mmengine', 'mmcv'):
        assert Path(origins[name]) == site, f'{name} came from {origins[name]}, not the pack'
    packed = {n for n, where in origins.items() if Path(where) == site}
    outside = {n for n in origins if n not in packed and n != 'mmhat'} - MACHINE_PROVIDES
    assert not outside, f'imported from neither the pack nor the target machine: {outside}'
    assert Path(origins['mmhat']) == ROOT


if __name__ == '__main__':
    sys.exit(main())
