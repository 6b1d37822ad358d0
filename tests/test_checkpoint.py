"""Checkpoint files: safe loading (torch >= 2.6 weights_only), unwrapping, conversion, errors."""
import argparse
import os
import pickle

import numpy as np
import pytest
import torch

from mmhat.checkpoint import (CheckpointError, checkpoint_safe_globals, convert_state_dict,
                              extract_state_dict, load_checkpoint_file)
from mmhat.engine import resumable_checkpoints


def _training_checkpoint():
    """What STACK.md measured failing under weights_only=True: argparse args, numpy scalars
    in meta, mmengine's HistoryBuffer in a resume checkpoint."""
    from mmengine.logging.history_buffer import HistoryBuffer
    buf = HistoryBuffer()
    buf.update(1.5)
    return {'model': {'w': torch.ones(2)}, 'args': argparse.Namespace(lr=0.1, model='x'),
            'meta': {'seed': np.int64(3), 'loss': np.float32(0.5), 'arr': np.arange(3)},
            'message_hub': {'log_scalars': {'loss': buf}}}


def test_training_checkpoints_save_and_load_inside_the_block_only(tmp_path):
    path = tmp_path / 'c.pth'
    with resumable_checkpoints():
        torch.save(_training_checkpoint(), path)
        loaded = torch.load(path)  # the default, as mmengine calls it
    assert loaded['args'].lr == 0.1 and loaded['meta']['seed'] == 3
    assert loaded['message_hub']['log_scalars']['loss'].current() == 1.5
    with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
        torch.load(path)  # outside: torch's list is as it was
    # saved outside the block, mmengine's HistoryBuffer carries getattr references that no
    # allow-list admits: that is why saving needs the block too
    torch.save(_training_checkpoint(), tmp_path / 'd.pth')
    with resumable_checkpoints(), pytest.raises(pickle.UnpicklingError, match='getattr'):
        torch.load(tmp_path / 'd.pth')


def test_safe_globals_nest_and_restore():
    before = torch.serialization.get_safe_globals()
    with checkpoint_safe_globals():
        inside = torch.serialization.get_safe_globals()
        with checkpoint_safe_globals():
            assert torch.serialization.get_safe_globals() == inside
        assert torch.serialization.get_safe_globals() == inside  # the inner exit kept them
    assert argparse.Namespace in inside and argparse.Namespace not in before
    assert set(map(id, torch.serialization.get_safe_globals())) == set(map(id, before))


class _Payload:
    def __reduce__(self):
        return (os.system, ('touch "$MMHAT_PWNED"', ))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path, monkeypatch):
    marker = tmp_path / 'pwned'
    monkeypatch.setenv('MMHAT_PWNED', str(marker))
    path = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.ones(1)}, 'x': _Payload()}, path)
    with pytest.raises(CheckpointError, match='refused to load .*could run code'):
        load_checkpoint_file(str(path))
    assert not marker.exists()


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match=r'not found.*init_cfg=None'):
        load_checkpoint_file(str(tmp_path / 'nope.pth'))


def test_truncated_file_is_reported(tmp_path):
    path = tmp_path / 'cut.pth'
    torch.save({'model': {'w': torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_checkpoint_file(str(path))


def test_extract_state_dict_variants():
    w = torch.ones(1)
    assert extract_state_dict({'model': {'a': w}}) == {'a': w}
    assert extract_state_dict({'state_dict': {'module.a': w}}) == {'a': w}
    assert extract_state_dict({'backbone.a': w, 'neck.b': w}) == {'a': w}
    assert extract_state_dict({'x.a': w, 'y.b': w}, prefix='y.') == {'b': w}
    with pytest.raises(CheckpointError, match='no tensors'):
        extract_state_dict({'epoch': 3})
    with pytest.raises(CheckpointError, match="no key of the checkpoint starts with 'head.'"):
        extract_state_dict({'a': w}, prefix='head.')


def test_convert_state_dict_is_pure_and_ordered():
    sd = {'blocks.1.2.w': torch.ones(1), 'head.w': torch.ones(1)}
    out = convert_state_dict(sd, [(r'^blocks\.(\d)\.(\d)\.', r'stages.\1.blocks.\2.'),
                                  (r'\.w$', '.weight')], [(r'^head\.', 'classifier')],
                             native_prefixes=('stages.', ))
    assert list(sd) == ['blocks.1.2.w', 'head.w']
    assert list(out.state_dict) == ['stages.1.blocks.2.weight']
    assert out.dropped == {'head.w': 'classifier'}
    native = convert_state_dict(out.state_dict, [(r'.', 'X')], native_prefixes=('stages.', ))
    assert native.state_dict == out.state_dict and not native.converted
