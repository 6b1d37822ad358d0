"""Training checkpoints that resume: safely on every torch (2.1-2.13), and after being killed.

Two problems of mmengine 0.10.7, each fixed only where it is asked for (nothing here acts
on import):

* torch >= 2.6 loads with ``weights_only=True``, and mmengine's own checkpoints hold types it
  refuses: ``HistoryBuffer`` (allow-listed by :func:`mmhat.checkpoint.checkpoint_safe_globals`)
  and, inside it, ``getattr`` references to its statistics methods (which no allow-list may
  admit); before torch 2.6 mmengine unpickles anything. :func:`resumable_checkpoints` covers a
  run: mmengine's loading through mmhat's allow-listed loader (on every torch) while it
  loads, and ``HistoryBuffer`` pickled without those references while it saves.
  ``tools/train.py`` and ``tools/test.py`` run inside it; with mmdet's or mmseg's own
  ``train.py``, one config line does the same:
  ``custom_hooks = [dict(type='mmhat.ResumeCompatHook')]``.
* mmengine writes a checkpoint straight to its final name and then records it in
  ``<work_dir>/last_checkpoint``; a SIGKILL during either write leaves a truncated
  ``epoch_N.pth`` or an empty pointer that ``--resume`` then fails on. With
  :func:`use_atomic_checkpoints` checkpoints are written to a temporary name and renamed into
  place (a file under the final name is always complete), and
  :func:`latest_complete_checkpoint` finds the newest checkpoint that is complete.
"""
import contextlib
import glob
import os
import os.path as osp
import zipfile
from typing import Optional, Tuple, Union

from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import Hook
from mmengine.logging.history_buffer import HistoryBuffer

from mmhat.checkpoint import checkpoint_safe_globals
from mmhat.registry import HOOKS

ATOMIC_BACKEND = 'mmhat_atomic_local'


def _history_buffer_state(self) -> dict:
    """``HistoryBuffer`` state without its ``statistics_methods``: mmengine stores them as
    ``getattr(HistoryBuffer, 'min')`` references, which ``weights_only`` loading refuses.
    They are class-level and ``HistoryBuffer.__init__`` registers them again, so nothing is
    lost."""
    state = dict(self.__dict__)
    state.pop('statistics_methods', None)
    return state


@contextlib.contextmanager
def resumable_checkpoints():
    """A block in which mmengine checkpoints are saved and loaded with only tensors and the
    allow-listed types unpickled (``weights_only`` or its equivalent on torch < 2.5).

    Saving pickles ``HistoryBuffer`` without ``getattr`` references; loading allow-lists the
    types the files hold. Both are undone on exit, nested blocks included.
    """
    had_own = '__getstate__' in vars(HistoryBuffer)
    previous = vars(HistoryBuffer).get('__getstate__')
    HistoryBuffer.__getstate__ = _history_buffer_state
    try:
        with checkpoint_safe_globals():
            yield
    finally:
        if had_own:
            HistoryBuffer.__getstate__ = previous
        else:
            del HistoryBuffer.__getstate__


@HOOKS.register_module()
class ResumeCompatHook(Hook):
    """:func:`resumable_checkpoints` for a whole run, for mmdet's / mmseg's own ``train.py``:
    ``custom_hooks = [dict(type='mmhat.ResumeCompatHook')]`` makes ``--resume`` and
    ``load_from`` work on torch >= 2.6, and load safely on every torch (``tools/train.py``
    needs no hook).

    It enters the block at ``before_run``, which mmengine calls before it loads or resumes,
    and leaves it at ``after_run``.
    """
    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._block: Optional[contextlib.ExitStack] = None

    def before_run(self, runner) -> None:
        if self._block is None:
            self._block = contextlib.ExitStack()
            self._block.enter_context(resumable_checkpoints())

    def after_run(self, runner) -> None:
        if self._block is not None:
            self._block.close()
            self._block = None


class AtomicLocalBackend(LocalBackend):
    """Local files written to ``<name>.partial-<pid>``, fsynced, then renamed to ``name``."""

    def put(self, obj: bytes, filepath: Union[str, os.PathLike]) -> None:
        filepath = str(filepath)
        os.makedirs(osp.dirname(filepath) or '.', exist_ok=True)
        tmp = f'{filepath}.partial-{os.getpid()}'
        with open(tmp, 'wb') as f:
            f.write(obj)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filepath)  # atomic on POSIX: readers see the old or the new file


def use_atomic_checkpoints(cfg) -> None:
    """Make the config's CheckpointHook write local checkpoints atomically (registers the
    ``mmhat_atomic_local`` file backend with mmengine, the first time only)."""
    hook = (cfg.get('default_hooks') or {}).get('checkpoint')
    if not hook or hook.get('backend_args') or hook.get('file_client_args'):
        return  # the user chose a storage backend
    if '://' in str(hook.get('out_dir') or ''):
        return
    from mmengine.fileio.backends.registry_utils import backends
    if backends.get(ATOMIC_BACKEND) is not AtomicLocalBackend:
        register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)
    hook['backend_args'] = dict(backend=ATOMIC_BACKEND)


def is_complete_checkpoint(path: str) -> bool:
    """True if ``path`` is a readable torch zip checkpoint (its index is written last, so a
    truncated file fails to open)."""
    if not path or not osp.isfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith('data.pkl') for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def latest_complete_checkpoint(work_dir: str) -> Tuple[Optional[str], Optional[str]]:
    """The checkpoint ``--resume`` should use, and a note if the recorded one was unusable.

    The ``last_checkpoint`` record comes first; if it is missing, empty or points to an
    incomplete file, the newest complete ``epoch_*.pth`` / ``iter_*.pth`` is used.
    """
    recorded = None
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer) as f:
            recorded = f.read().strip()
        if is_complete_checkpoint(recorded):
            return recorded, None
    found = sorted(glob.glob(osp.join(work_dir, 'epoch_*.pth')) +
                   glob.glob(osp.join(work_dir, 'iter_*.pth')), key=osp.getmtime, reverse=True)
    for path in found:
        if is_complete_checkpoint(path):
            note = (f'last_checkpoint records {recorded!r}, which is missing or incomplete; '
                    f'resuming from {path}') if recorded is not None else None
            return path, note
    return None, None
