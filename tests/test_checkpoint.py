"""Checkpoint files: safe loading (every torch of 2.1-2.13), unwrapping, conversion, errors."""
import argparse
import os
import pickle

import numpy as np
import pytest
import torch

from mmengine.runner.checkpoint import CheckpointLoader

from mmhat import compat
from mmhat.checkpoint import (CheckpointError, checkpoint_safe_globals, convert_state_dict,
                              extract_state_dict, load_checkpoint_file, load_from_mmhat)
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


def test_training_checkpoints_save_and_load_inside_the_block(tmp_path):
    """What mmengine's runner does for --resume / load_from, on every supported torch."""
    path = tmp_path / 'c.pth'
    with resumable_checkpoints():
        torch.save(_training_checkpoint(), path)
        loaded = CheckpointLoader.load_checkpoint(str(path))
    assert loaded['args'].lr == 0.1 and loaded['meta']['seed'] == 3
    assert loaded['meta']['arr'].tolist() == [0, 1, 2]
    assert loaded['message_hub']['log_scalars']['loss'].current() == 1.5
    # saved outside the block, mmengine's HistoryBuffer carries getattr references that no
    # allow-list admits: that is why saving needs the block too
    torch.save(_training_checkpoint(), tmp_path / 'd.pth')
    with resumable_checkpoints(), pytest.raises(CheckpointError, match='getattr'):
        CheckpointLoader.load_checkpoint(str(tmp_path / 'd.pth'))


@pytest.mark.skipif(not compat.WEIGHTS_ONLY_BY_DEFAULT,
                    reason='torch < 2.6 unpickles anything by default (weights_only=False); '
                           'mmhat never relies on the default')
def test_torch_default_load_follows_the_block(tmp_path):
    path = tmp_path / 'c.pth'
    with resumable_checkpoints():
        torch.save(_training_checkpoint(), path)
        assert torch.load(path)['args'].lr == 0.1  # the default, as other code calls it
    with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
        torch.load(path)  # outside: torch's list is as it was


@pytest.mark.skipif(not compat.HAS_SAFE_GLOBALS,
                    reason='torch < 2.5 has no scoped weights_only allow-list to extend')
def test_safe_globals_nest_and_restore():
    before = torch.serialization.get_safe_globals()
    with checkpoint_safe_globals():
        inside = torch.serialization.get_safe_globals()
        with checkpoint_safe_globals():
            assert torch.serialization.get_safe_globals() == inside
        assert torch.serialization.get_safe_globals() == inside  # the inner exit kept them
    assert argparse.Namespace in inside and argparse.Namespace not in before
    assert set(map(id, torch.serialization.get_safe_globals())) == set(map(id, before))


def test_mmengine_loaders_are_routed_inside_the_block_only():
    get = CheckpointLoader._get_checkpoint_loader
    before = {p: get(p + 'x.pth') for p in ('', 'https://', 'http://', 's3://')}
    with checkpoint_safe_globals():
        inside = {p: get(p + 'x.pth') for p in before}
        with checkpoint_safe_globals():
            assert {p: get(p + 'x.pth') for p in before} == inside
        assert {p: get(p + 'x.pth') for p in before} == inside
    assert inside[''] is inside['https://'] is inside['http://'] is load_from_mmhat
    assert inside['s3://'] is before['s3://']  # other schemes are left to mmengine
    assert {p: get(p + 'x.pth') for p in before} == before
    assert list(CheckpointLoader._schemes)[-1] == ''  # the longest-prefix order is kept


class _Payload:
    def __reduce__(self):
        return (os.system, ('touch "$MMHAT_PWNED"', ))


def _via_mmengine(path):
    with checkpoint_safe_globals():
        return CheckpointLoader.load_checkpoint(path)


def _via_mmengine_http(path, monkeypatch):
    monkeypatch.setattr('mmhat.checkpoint._download', lambda url: path)
    return _via_mmengine('https://example.invalid/evil.pth')


def _restricted_unpickler(path, monkeypatch):
    """The torch < 2.5 path, forced on whatever torch runs the test."""
    monkeypatch.setattr(compat, 'HAS_SAFE_GLOBALS', False)
    return load_checkpoint_file(path)


LOADERS = {'load_checkpoint_file': lambda path, mp: load_checkpoint_file(path),
           'mmengine local': lambda path, mp: _via_mmengine(path),
           'mmengine https': _via_mmengine_http,
           'restricted unpickler': _restricted_unpickler}


@pytest.mark.parametrize('loader', sorted(LOADERS))
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, monkeypatch, loader):
    marker = tmp_path / 'pwned'
    monkeypatch.setenv('MMHAT_PWNED', str(marker))
    path = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.ones(1)}, 'x': _Payload()}, path)
    with pytest.raises(CheckpointError,
                       match=r'refused to load .*could run code.*Detail: .*posix\.system'):
        LOADERS[loader](str(path), monkeypatch)
    assert not marker.exists()


@pytest.mark.parametrize('loader', sorted(LOADERS))
def test_every_loader_reads_official_and_training_checkpoints(tmp_path, monkeypatch, loader):
    """The allow-list admits what official (DeiT-style) and mmengine checkpoints hold, on
    torch's own weights_only loader and on the restricted unpickler alike."""
    path = tmp_path / 'ok.pth'
    with resumable_checkpoints():
        torch.save(_training_checkpoint(), path)
    sd = {'w': torch.randn(3, dtype=torch.float64), 'b': torch.ones(2, dtype=torch.bfloat16),
          'p': torch.nn.Parameter(torch.ones(2)), 'i': torch.arange(4)}
    torch.save({'model': sd, 'epoch': 3, 'args': argparse.Namespace(lr=1e-3),
                'dtype': torch.float16, 'size': torch.Size([1, 2]),
                'ids': {1, 2}, 'name': b'bytes'}, tmp_path / 'official.pth')
    train = LOADERS[loader](str(path), monkeypatch)
    assert train['meta']['loss'] == np.float32(0.5)
    assert train['message_hub']['log_scalars']['loss'].current() == 1.5
    official = LOADERS[loader](str(tmp_path / 'official.pth'), monkeypatch)
    assert official['args'].lr == 1e-3 and official['dtype'] is torch.float16
    assert official['size'] == (1, 2) and official['ids'] == {1, 2}
    for key, value in sd.items():
        assert official['model'][key].dtype == value.dtype
        assert torch.equal(official['model'][key], value.detach())


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
