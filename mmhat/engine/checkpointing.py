"""Checkpoints that survive being killed: atomic writes, and resuming from a complete file.

mmengine 0.10.7 writes a checkpoint straight to its final name and then records it in
``<work_dir>/last_checkpoint``; a SIGKILL during either write leaves a truncated
``epoch_N.pth`` or an empty pointer that ``--resume`` then fails on. Here checkpoints are
written to a temporary name and renamed into place (a file under the final name is always
complete), and ``--resume`` picks the newest checkpoint that is complete.
"""
import glob
import os
import os.path as osp
import zipfile
from typing import Optional, Tuple, Union

from mmengine.fileio import LocalBackend, register_backend

ATOMIC_BACKEND = 'mmhat_atomic_local'


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


register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)


def use_atomic_checkpoints(cfg) -> None:
    """Make the config's CheckpointHook write local checkpoints atomically."""
    hook = (cfg.get('default_hooks') or {}).get('checkpoint')
    if not hook or hook.get('backend_args') or hook.get('file_client_args'):
        return  # the user chose a storage backend
    if '://' in str(hook.get('out_dir') or ''):
        return
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
