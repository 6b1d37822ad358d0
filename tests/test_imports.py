"""Importing mmhat changes nothing outside mmhat, proven in fresh processes.

Each check starts a new interpreter, imports what mmhat itself imports (torch, mmengine,
mmcv and its ops), takes a snapshot of the global state mmhat once patched or could patch
(torch's weights_only allow-list and global flags, mmengine's HistoryBuffer, checkpoint
loaders, file backends and registries, mmcv's RoIAlign/NMS, warning filters), imports
mmhat's modules, and compares.
The one intended change is mmengine's root registries gaining the child registry ``mmhat``
(that is how ``type='mmhat.X'`` resolves).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

SNAPSHOT = r'''
import json, sys, warnings
import torch, numpy
import mmengine, mmengine.config, mmengine.fileio, mmengine.hooks, mmengine.logging
import mmengine.model, mmengine.optim, mmengine.registry, mmengine.runner
from mmengine.fileio.backends import registry_utils
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader
import mmcv, mmcv.cnn
from mmcv.ops.nms import NMSop
from mmcv.ops.roi_align import RoIAlign


def registries():
    out = {}
    for name in dir(mmengine.registry):
        reg = getattr(mmengine.registry, name)
        if isinstance(reg, mmengine.registry.Registry):
            out[name] = dict(modules=sorted(reg._module_dict), children=sorted(reg._children))
    return out


def snapshot():
    return dict(
        # torch < 2.5 has no scoped allow-list to change
        safe_globals=sorted(repr(g) for g in
                            getattr(torch.serialization, 'get_safe_globals', list)()),
        checkpoint_schemes={k: id(v) for k, v in CheckpointLoader._schemes.items()},
        history_buffer={k: id(v) for k, v in vars(HistoryBuffer).items()},
        roi_align={k: id(v) for k, v in vars(RoIAlign).items()},
        nms={k: id(v) for k, v in vars(NMSop).items()},
        file_backends={k: id(v) for k, v in registry_utils.backends.items()},
        file_prefixes={k: id(v) for k, v in registry_utils.prefix_to_backends.items()},
        registries=registries(),
        torch_flags=[torch.get_num_threads(), str(torch.get_default_dtype()),
                     torch.are_deterministic_algorithms_enabled(),
                     torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark,
                     torch.backends.mkldnn.enabled, torch.is_grad_enabled()],
        warning_filters=len(warnings.filters),
        torch_load=id(torch.load), torch_save=id(torch.save))


before = snapshot()
for module in sys.argv[1:]:
    __import__(module)
after = snapshot()
print(json.dumps(dict(before=before, after=after)))
'''

MODULES = [['mmhat'], ['mmhat.models'], ['mmhat.engine'], ['mmhat.checkpoint'],
           ['mmhat.utils.flops'],
           ['mmhat', 'mmhat.models', 'mmhat.engine', 'mmhat.models.layers']]


@pytest.mark.parametrize('modules', MODULES, ids=['+'.join(m) for m in MODULES])
def test_import_changes_nothing_outside_mmhat(modules):
    proc = subprocess.run([sys.executable, '-c', SNAPSHOT, *modules], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    before, after = state['before'], state['after']
    # the intended change: the mmhat child registries, and nothing else in the registries
    for name, reg in after['registries'].items():
        assert reg['modules'] == before['registries'][name]['modules'], name
        assert set(reg['children']) - set(before['registries'][name]['children']) <= {'mmhat'}
    for key in before:
        if key != 'registries':
            assert after[key] == before[key], f'importing {modules} changed {key}'
