"""Training-time helpers: atomic checkpoints, resuming from a complete file, CPU AMP."""
import os
import time

import pytest
import torch
from mmengine.config import Config
from mmengine.fileio import get_file_backend

from mmhat.engine import (AtomicLocalBackend, is_complete_checkpoint,
                          latest_complete_checkpoint, use_atomic_checkpoints)
from mmhat.engine.checkpointing import ATOMIC_BACKEND


def save(path, value=1.0):
    torch.save({'state_dict': {'w': torch.full((100, ), value)}, 'meta': {}}, path)
    return str(path)


def test_atomic_backend_writes_complete_files_only(tmp_path):
    cfg = Config(dict(default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1))))
    use_atomic_checkpoints(cfg)  # registers the backend with mmengine, as tools/train.py does
    backend = get_file_backend(str(tmp_path), backend_args=cfg.default_hooks.checkpoint.backend_args)
    assert isinstance(backend, AtomicLocalBackend)
    target = tmp_path / 'sub' / 'epoch_1.pth'
    backend.put(b'abc', target)
    assert target.read_bytes() == b'abc'
    assert os.listdir(target.parent) == ['epoch_1.pth']  # no temporary file left behind


def test_truncated_checkpoint_is_not_complete(tmp_path):
    path = save(tmp_path / 'a.pth')
    assert is_complete_checkpoint(path)
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])
    assert not is_complete_checkpoint(path)
    assert not is_complete_checkpoint(str(tmp_path / 'missing.pth'))
    assert not is_complete_checkpoint('')


@pytest.mark.parametrize('pointer', ['ok', 'empty', 'truncated', 'missing_file', 'absent'])
def test_resume_picks_the_newest_complete_checkpoint(tmp_path, pointer):
    first = save(tmp_path / 'epoch_1.pth', 1)
    time.sleep(0.01)
    second = save(tmp_path / 'epoch_2.pth', 2)
    record = tmp_path / 'last_checkpoint'
    expected, noted = second, False
    if pointer == 'ok':
        record.write_text(second)
    elif pointer == 'empty':  # killed between truncating and writing the record
        record.write_text('')
        noted = True
    elif pointer == 'truncated':  # killed while writing epoch_2 without atomic writes
        data = open(second, 'rb').read()
        open(second, 'wb').write(data[:100])
        record.write_text(second)
        expected, noted = first, True
    elif pointer == 'missing_file':
        record.write_text(str(tmp_path / 'epoch_3.pth'))
        noted = True
    path, note = latest_complete_checkpoint(str(tmp_path))
    assert path == expected
    assert (note is not None) == noted


def test_no_checkpoint_to_resume(tmp_path):
    assert latest_complete_checkpoint(str(tmp_path)) == (None, None)


def test_use_atomic_checkpoints_respects_user_backends():
    cfg = Config(dict(default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1))))
    use_atomic_checkpoints(cfg)
    assert cfg.default_hooks.checkpoint.backend_args == dict(backend=ATOMIC_BACKEND)
    cfg = Config(dict(default_hooks=dict(checkpoint=dict(
        type='CheckpointHook', backend_args=dict(backend='petrel')))))
    use_atomic_checkpoints(cfg)
    assert cfg.default_hooks.checkpoint.backend_args == dict(backend='petrel')


def test_bf16_autocast_optim_wrapper_trains_in_bf16():
    from mmhat.registry import OPTIM_WRAPPERS
    model = torch.nn.Linear(8, 4)
    # scoped, as configs name it: the default scope may be mmdet's or mmseg's
    wrapper = OPTIM_WRAPPERS.build(dict(type='mmhat.BF16AutocastOptimWrapper',
                                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))
    with wrapper.optim_context(model):
        out = model(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16
    before = model.weight.detach().clone()
    wrapper.update_params(out.float().square().mean())
    assert not torch.equal(before, model.weight)


def test_bf16_wrapper_casts_mmcv_ops_inside_its_forward_only():
    """RoIAlign/NMS get float32 inputs inside the wrapper's forward context (their CPU
    kernels have no bf16 version), and are mmcv's own again outside it."""
    from mmcv.ops import RoIAlign, nms
    from mmcv.ops.nms import NMSop
    from mmhat.registry import OPTIM_WRAPPERS
    before = (vars(RoIAlign)['forward'], vars(NMSop)['forward'])
    model = torch.nn.Linear(4, 4)
    wrapper = OPTIM_WRAPPERS.build(dict(type='mmhat.BF16AutocastOptimWrapper',
                                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))
    feats = torch.randn(1, 8, 16, 16)
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 9.0]])
    boxes, scores = torch.tensor([[0, 0, 4, 4.], [1, 1, 5, 5.]]), torch.tensor([0.9, 0.8])
    with wrapper.optim_context(model):
        assert vars(RoIAlign)['forward'] is not before[0]
        out = RoIAlign((2, 2), 1.0)(feats.bfloat16(), rois.bfloat16())
        assert out.dtype == torch.bfloat16
        kept, _ = nms(boxes.bfloat16(), scores.bfloat16(), 0.5)
    assert (vars(RoIAlign)['forward'], vars(NMSop)['forward']) == before
    with pytest.raises(RuntimeError, match='BFloat16'):  # mmcv's own kernel, outside
        with torch.autocast('cpu', dtype=torch.bfloat16):
            RoIAlign((2, 2), 1.0)(feats.bfloat16(), rois.bfloat16())
