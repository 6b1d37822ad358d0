"""Loading official and mmhat checkpoints: safe unpickling, unwrapping, converting, reporting.

Everything that touches a checkpoint file goes through this module:

* :func:`checkpoint_safe_globals` allow-lists, inside a ``with`` block, exactly the non-tensor
  types that official classification checkpoints and mmengine training checkpoints contain,
  so that torch's ``weights_only=True`` default (torch >= 2.6) loads them and a checkpoint
  carrying any other pickled object is refused (it cannot run code). Nothing is changed
  outside the block; :mod:`mmhat.engine.checkpointing` uses it for ``--resume``.
* :func:`load_checkpoint_file` reads a local path or URL and turns every failure into an
  error that says what to do.
* :func:`extract_state_dict` unwraps ``model`` / ``state_dict`` / ``module`` containers and
  ``module.`` / ``backbone.`` prefixes.
* :func:`convert_state_dict` applies a family's explicit rename table (a pure function).
* :func:`load_state_dict_strict` loads with every missing, unexpected or mis-shaped key
  reported by name.
"""
import argparse
import contextlib
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

StateDict = Dict[str, torch.Tensor]
# A rename rule: (regex, replacement) applied with re.sub to every key, in order.
RenameRule = Tuple[str, Union[str, Callable[[re.Match], str]]]
# A drop rule: (regex, reason); keys that match are removed and reported with the reason.
DropRule = Tuple[str, str]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, corrupt, unsafe or of another model."""


# ---------------------------------------------------------------------------------------
# Safe unpickling
# ---------------------------------------------------------------------------------------
def _safe_global_types() -> list:
    import numpy as np
    types: list = [argparse.Namespace, np.ndarray, np.dtype]
    # numpy scalars and arrays pickle through these reconstructors (numpy 2 renamed the module).
    for mod_name in ('numpy._core.multiarray', 'numpy.core.multiarray'):
        try:
            mod = __import__(mod_name, fromlist=['scalar', '_reconstruct'])
        except ImportError:
            continue
        types += [mod.scalar, mod._reconstruct]
        break
    # The dtype classes numpy pickles dtypes with (np.dtypes.Float64DType, ...).
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        types += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith('DType')]
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
        types.append(HistoryBuffer)
    except ImportError:  # pragma: no cover - mmengine is a hard dependency
        pass
    return types


@contextlib.contextmanager
def checkpoint_safe_globals():
    """Allow-list, for the duration of the block, the non-tensor types that official and
    mmengine checkpoints legitimately hold.

    torch >= 2.6 loads with ``weights_only=True`` by default and refuses every other global:
    DeiT-style classification checkpoints store ``argparse.Namespace``, mmengine's store numpy
    scalars and ``HistoryBuffer``. Turning ``weights_only`` off instead would let a downloaded
    file execute arbitrary code. Only the types not already allowed are added, and exactly
    those are removed on exit, so the block nests and leaves torch's list as it found it.
    """
    before = set(map(id, torch.serialization.get_safe_globals()))
    added = [t for t in _safe_global_types() if id(t) not in before]
    with torch.serialization.safe_globals(added):
        yield


# ---------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------
def load_checkpoint_file(filename: str, map_location: str = 'cpu') -> dict:
    """Read a checkpoint from a local path or a URL (``http(s)://``, cached by torch.hub).

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, or holds objects that are
            not on the allow-list (refused without executing them).
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    is_url = '://' in filename
    if not is_url and not os.path.isfile(filename):
        raise CheckpointError(
            f'checkpoint file not found: {filename!r}. Download it (see the README section '
            f'"Model zoo" for where each official checkpoint lives) and put it at that path, '
            f'or set the backbone\'s init_cfg=None to start from random weights.')
    try:
        with checkpoint_safe_globals():
            return CheckpointLoader.load_checkpoint(filename, map_location=map_location)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'refused to load {filename!r}: it contains pickled objects that are not plain '
            f'tensors or known checkpoint metadata, and loading them could run code. mmhat '
            f'loads with torch.load(weights_only=True). If you trust the file, convert it in a '
            f'separate step (tools/convert_checkpoint.py) and load the result. Detail: '
            f'{str(e).splitlines()[0]}') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(
            f'cannot read checkpoint {filename!r}: the file looks truncated or corrupt '
            f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}). Download it '
            f'again.') from None


# ---------------------------------------------------------------------------------------
# Unwrapping and converting
# ---------------------------------------------------------------------------------------
def extract_state_dict(checkpoint: dict, prefix: Optional[str] = None) -> StateDict:
    """Find the weights in a checkpoint and strip wrapper prefixes.

    Handles ``{'model': sd}`` (official releases), ``{'state_dict': sd}`` (mmengine),
    ``{'module': sd}``, a bare state_dict, ``module.`` prefixes (DDP) and ``backbone.``
    prefixes (a whole mmdet/mmseg model, of which only the backbone is kept).

    Args:
        checkpoint: what :func:`load_checkpoint_file` returned.
        prefix: keep only keys under this prefix (e.g. ``'backbone.'``), stripped.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'expected a dict checkpoint, got {type(checkpoint).__name__}')
    sd = checkpoint
    for wrapper in ('state_dict', 'model', 'module'):
        if isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError('the checkpoint holds no tensors (expected weights under '
                              '"model", "state_dict" or at the top level)')
    if all(k.startswith('module.') for k in sd):
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    if prefix is None and any(k.startswith('backbone.') for k in sd):
        prefix = 'backbone.'
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f'no key of the checkpoint starts with {prefix!r}')
    return sd


@dataclass
class Conversion:
    """Result of converting a state_dict: the weights and what was dropped, with why.

    ``converted``: official keys were renamed; ``legacy_renamed``: keys of an earlier mmhat
    layout that were renamed to today's (old key -> new key).
    """
    state_dict: StateDict
    dropped: Dict[str, str] = field(default_factory=dict)
    converted: bool = False
    legacy_renamed: Dict[str, str] = field(default_factory=dict)


def _rename(key: str, rules: Sequence[RenameRule]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def convert_state_dict(state_dict: StateDict,
                       rename_rules: Sequence[RenameRule],
                       drop_rules: Sequence[DropRule] = (),
                       native_prefixes: Sequence[str] = (),
                       legacy_rules: Sequence[RenameRule] = ()) -> Conversion:
    """Rename official keys to mmhat's, dropping the keys mmhat does not use.

    A pure function: the input is not modified.

    Args:
        state_dict: official (or already mmhat) weights.
        rename_rules: ``(regex, replacement)`` pairs applied in order to every key.
        drop_rules: ``(regex, reason)``; matching keys are removed and reported.
        native_prefixes: if any key starts with one of these, the weights are already in
            mmhat format: only ``legacy_rules`` apply (the names of earlier mmhat releases
            become today's), nothing is dropped.
        legacy_rules: ``(regex, replacement)`` pairs for mmhat-format keys.
    """
    if native_prefixes and any(k.startswith(tuple(native_prefixes)) for k in state_dict):
        out: StateDict = {}
        renamed: Dict[str, str] = {}
        for key, value in state_dict.items():
            new_key = _rename(key, legacy_rules)
            if new_key != key:
                renamed[key] = new_key
            out[new_key] = value
        return Conversion(out, {}, converted=False, legacy_renamed=renamed)
    out = {}
    dropped: Dict[str, str] = {}
    for key, value in state_dict.items():
        reason = next((why for pattern, why in drop_rules if re.search(pattern, key)), None)
        if reason is not None:
            dropped[key] = reason
            continue
        out[_rename(key, rename_rules)] = value
    return Conversion(out, dropped, converted=True)


def _summarise(keys: List[str], limit: int = 8) -> str:
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def load_state_dict_strict(model: nn.Module, state_dict: StateDict, source: str = '',
                           hint: str = '') -> None:
    """``model.load_state_dict(strict=True)`` with an error that names the problem keys.

    Raises:
        CheckpointError: listing missing keys, unexpected keys and shape mismatches
            (first keys of each, with shapes), plus ``hint``.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        lines = [f'checkpoint {source!r} does not fit {type(model).__name__}:']
        if mismatched:
            lines.append(f'  {len(mismatched)} shape mismatches: {_summarise(mismatched, 4)}')
        if missing:
            lines.append(f'  {len(missing)} missing keys: {_summarise(missing)}')
        if unexpected:
            lines.append(f'  {len(unexpected)} unexpected keys: {_summarise(unexpected)}')
        if hint:
            lines.append(f'  {hint}')
        raise CheckpointError('\n'.join(lines))
    model.load_state_dict(state_dict, strict=True)
