"""Loading official and mmhat checkpoints: safe unpickling, unwrapping, converting, reporting.

Everything that touches a checkpoint file goes through this module:

* :func:`safe_torch_load` unpickles tensors and exactly the non-tensor types that official
  classification checkpoints and mmengine training checkpoints contain, on every supported
  torch (``weights_only=True`` with an allow-list from torch 2.5, a restricted unpickler
  before: :mod:`mmhat.compat`); a checkpoint carrying any other pickled object is refused
  without running it. :func:`checkpoint_safe_globals` makes mmengine's own loading
  (``load_from``, ``--resume``) do the same inside a ``with`` block; nothing is changed
  outside it. :mod:`mmhat.engine.checkpointing` uses it for ``--resume``.
* :func:`check_checkpoint_source` refuses, before anything is downloaded, checkpoints that
  name another model's zoo (``open-mmlab://``, ``torchvision://``, ...): in a swapped-in
  mmdet/mmseg config they come from the base config, not from the user.
* :func:`load_checkpoint_file` reads a local path or URL (downloaded into torch hub's cache,
  as mmengine does, then read like a local file) and turns every failure into an error that
  says what to do; a failed download is reported as one, never as a corrupt file.
* :func:`extract_state_dict` unwraps ``model`` / ``state_dict`` / ``module`` containers and
  ``module.`` / ``backbone.`` prefixes.
* :func:`convert_state_dict` applies a family's explicit rename table (a pure function).
* :func:`load_state_dict_strict` loads with every missing, unexpected or mis-shaped key
  reported by name, and says which model a checkpoint of another network looks like.
"""
import argparse
import contextlib
import http.client
import os
import pickle
import re
import urllib.error
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import torch
from torch import nn

from mmhat import compat

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


def safe_torch_load(filename, map_location='cpu'):
    """``torch.load`` that admits tensors and the types of :func:`_safe_global_types` only,
    on every supported torch (:func:`mmhat.compat.load_restricted`): a pickled object of any
    other type raises ``pickle.UnpicklingError`` without being run."""
    return compat.load_restricted(filename, map_location, _safe_global_types())


def load_from_mmhat(filename: str, map_location=None) -> dict:
    """mmengine's local and http(s) checkpoint loader inside :func:`checkpoint_safe_globals`:
    :func:`load_checkpoint_file` (mmengine's own unpickle without ``weights_only``, which
    before torch 2.6 admits anything, and for URLs does so on every torch). mmengine logs it
    as the ``mmhat`` backend (the name after ``load_from_``)."""
    return load_checkpoint_file(filename, map_location or 'cpu')


#: mmengine's checkpoint schemes that :func:`checkpoint_safe_globals` reads safely.
_SAFE_SCHEMES = {prefix: load_from_mmhat for prefix in ('', 'http://', 'https://')}


@contextlib.contextmanager
def checkpoint_safe_globals():
    """A block in which checkpoints are unpickled with exactly the non-tensor types that
    official and mmengine checkpoints legitimately hold allowed, on every supported torch.

    * mmengine's local and http(s) loaders (``load_from``, ``--resume``, ``Pretrained``) read
      through :func:`load_checkpoint_file`: refused objects raise :class:`CheckpointError`.
      (mmengine calls ``torch.load`` without ``weights_only``: before torch 2.6 that unpickles
      anything, and its http loader does so on every torch.)
    * where torch keeps a ``weights_only`` allow-list (torch >= 2.5), the types are added to
      it, so that other code calling ``torch.load`` in the block (torch >= 2.6: safely by
      default) reads these files too.

    DeiT-style classification checkpoints store ``argparse.Namespace``, mmengine's store numpy
    scalars and ``HistoryBuffer``. Turning ``weights_only`` off instead would let a downloaded
    file execute arbitrary code. Only what is not already there is added, and exactly that is
    undone on exit, so the block nests and leaves torch and mmengine as it found them.
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    schemes = CheckpointLoader._schemes
    saved = {prefix: schemes.get(prefix) for prefix in _SAFE_SCHEMES}
    schemes.update(_SAFE_SCHEMES)  # existing keys: mmengine's longest-prefix order is kept
    try:
        if compat.HAS_SAFE_GLOBALS:
            before = set(map(id, compat.safe_globals_list()))
            added = [t for t in _safe_global_types() if id(t) not in before]
            with torch.serialization.safe_globals(added):
                yield
        else:
            yield
    finally:
        for prefix, loader in saved.items():
            if loader is None:
                schemes.pop(prefix, None)
            else:
                schemes[prefix] = loader


# ---------------------------------------------------------------------------------------
# Checkpoints of other models
# ---------------------------------------------------------------------------------------
#: Where the official and mmhat checkpoints are listed (named in every error below).
MODEL_ZOO = 'docs/model_zoo.md, "Checkpoints": where each official checkpoint lives'

_MMSEG_ORIGIN = ("mmseg's base configs set model.pretrained='open-mmlab://resnet50_v1c' (an "
                 "ImageNet ResNet), which the segmentor passes on to the backbone: set "
                 "model.pretrained=None")
_MMDET_ORIGIN = ("mmdet's R50 configs set the backbone's init_cfg to 'torchvision://resnet50', "
                 "which stays in a backbone swapped in without _delete_=True: add "
                 "_delete_=True to the backbone dict")

#: mmengine's (and timm's) model-zoo schemes: what they name, and which base config most
#: likely put one into an mmhat backbone. No mmhat checkpoint is published under any of them.
FOREIGN_SCHEMES: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    'open-mmlab://': ('an OpenMMLab model-zoo checkpoint (ImageNet ResNet, ResNeXt, HRNet, ...)',
                      (_MMSEG_ORIGIN, _MMDET_ORIGIN)),
    'openmmlab://': ('an OpenMMLab model-zoo checkpoint (ImageNet ResNet, ResNeXt, HRNet, ...)',
                     (_MMSEG_ORIGIN, _MMDET_ORIGIN)),
    'torchvision://': ('a torchvision ImageNet model', (_MMDET_ORIGIN, _MMSEG_ORIGIN)),
    'modelzoo://': ('a torchvision ImageNet model (modelzoo:// is the old torchvision://)',
                    (_MMDET_ORIGIN, _MMSEG_ORIGIN)),
    'mmcls://': ('an mmpretrain (mmcls) classifier', (_MMSEG_ORIGIN, _MMDET_ORIGIN)),
    'mmpretrain://': ('an mmpretrain classifier', (_MMSEG_ORIGIN, _MMDET_ORIGIN)),
    'timm://': ('a timm model', (_MMSEG_ORIGIN, _MMDET_ORIGIN)),
}


def _own_weights_fix(model_name: str) -> str:
    family = model_name.split('.')[-1]
    return (f"For ImageNet weights point the backbone's init_cfg=dict(type='Pretrained', "
            f"checkpoint=...) at an mmhat or official {family} checkpoint ({MODEL_ZOO}), or "
            f"set it to None for random weights.")


def foreign_checkpoint_message(checkpoint: str, model_name: str,
                               origin: Optional[str] = None) -> Optional[str]:
    """Why ``checkpoint`` cannot be ``model_name``'s, where it likely came from and the fix;
    ``None`` if it is not one of :data:`FOREIGN_SCHEMES`.

    Args:
        checkpoint: the ``Pretrained`` checkpoint (or ``pretrained=``) the backbone was given.
        model_name: the backbone, e.g. ``'mmhat.HATNet'``.
        origin: the config key that holds it (``'model.pretrained'``,
            ``'model.backbone.init_cfg'``), when the caller knows it.
    """
    scheme = next((s for s in FOREIGN_SCHEMES if checkpoint.startswith(s)), None)
    if scheme is None:
        return None
    what, origins = FOREIGN_SCHEMES[scheme]
    if origin is None:
        where = f'It most likely comes from the base config: {"; or ".join(origins)}.'
    else:
        injected = origin.endswith('pretrained')  # mmseg's segmentor-level argument
        where = f'It is set by {origin}: {_MMSEG_ORIGIN if injected else _MMDET_ORIGIN}.'
    return (f'{model_name} cannot load {checkpoint!r}: {scheme} names {what}, not a '
            f'{model_name.split(".")[-1]} checkpoint, so nothing was downloaded. {where} '
            f'{_own_weights_fix(model_name)}')


def check_checkpoint_source(checkpoint: str, model_name: str,
                            origin: Optional[str] = None) -> None:
    """Raise :class:`CheckpointError` if ``checkpoint`` names another model's zoo
    (:func:`foreign_checkpoint_message`), before anything is downloaded."""
    message = foreign_checkpoint_message(checkpoint, model_name, origin)
    if message:
        raise CheckpointError(message)


# ---------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------
#: What the download of a URL raises when the network fails, as ``urllib.request.urlopen``
#: (called by ``torch.hub.download_url_to_file``, which mmengine's ``load_from_http`` reaches
#: through ``torch.hub.load_state_dict_from_url``) raises it: ``URLError`` (no route, DNS,
#: refused, SSL; ``HTTPError`` for a 4xx/5xx status), socket errors and timeouts (``OSError``),
#: and ``http.client`` errors from a connection cut mid-transfer (``IncompleteRead``).
DOWNLOAD_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException)


def hub_cache_path(url: str) -> str:
    """Where mmengine (``torch.hub.load_state_dict_from_url`` without ``model_dir``) keeps
    the file of ``url``: ``<torch.hub.get_dir()>/checkpoints/<file name of the URL>``."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(urlparse(url).path))


def download_failure_message(url: str, cached: str, error: Optional[BaseException]) -> str:
    """A failed download: the URL, the error, and where to put the file by hand."""
    detail = (f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}'
              if error is not None else 'another rank could not download it either')
    return (f'could not download checkpoint {url!r} ({detail}). This is a download failure, '
            f'not a bad file: download it by hand and put it at {cached} (torch hub\'s '
            f'checkpoint folder, where mmengine looks for this URL), or anywhere and point the '
            f'backbone\'s init_cfg=dict(type=\'Pretrained\', checkpoint=...) at that local path '
            f'({MODEL_ZOO}).')


def _download(url: str) -> str:
    """Fetch ``url`` into torch hub's cache unless it is there; return the cached path.

    mmengine's ``load_from_http`` downloads on rank 0 while the other ranks wait, then reads
    the file with ``torch.load(weights_only=False)``; here the download is the same, and the
    file is then read like a local one (``weights_only=True``, :func:`checkpoint_safe_globals`).
    """
    from mmengine.dist import barrier, get_dist_info
    from mmengine.logging import print_log
    cached = hub_cache_path(url)

    def fetch() -> None:
        if os.path.isfile(cached):
            return
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        print_log(f'Downloading {url} to {cached}', logger='current')
        try:
            torch.hub.download_url_to_file(url, cached, progress=os.isatty(0))
        except DOWNLOAD_ERRORS as e:
            raise CheckpointError(download_failure_message(url, cached, e)) from None

    rank, world_size = get_dist_info()
    if world_size == 1:
        fetch()
        return cached
    try:
        if rank == 0:
            fetch()
    finally:  # the other ranks go on even when rank 0 failed, and fail with their own message
        barrier()
    fetch()  # a no-op where rank 0's cache is shared; a node of its own downloads its copy
    return cached


def _refusal_detail(error: pickle.UnpicklingError) -> str:
    """What was refused, in the same words on every torch (torch's weights_only loader and
    the restricted unpickler both name the global)."""
    text = str(error)
    found = re.search(r'GLOBAL ([\w.]+)', text)
    if found:
        return f'it pickles {found.group(1)}, which is not on the allow-list'
    lines = [line for line in text.splitlines() if line.strip()]
    return next((line for line in lines if 'nsupported' in line), lines[0] if lines else '')


def load_checkpoint_file(filename: str, map_location: str = 'cpu') -> dict:
    """Read a checkpoint from a local path or a URL (``http(s)://``, cached by torch.hub).

    Raises:
        CheckpointError: the file is missing, cannot be downloaded, is truncated/corrupt, or
            holds objects that are not on the allow-list (refused without executing them).
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    local = '://' not in filename
    if local:
        filename = os.path.expanduser(filename)
    source = filename
    if filename.startswith(('http://', 'https://')):
        filename = _download(filename)
        source = f'{filename} (downloaded from {source})'
        local = True
    elif local and not os.path.isfile(filename):
        raise CheckpointError(
            f'checkpoint file not found: {filename!r}. Check the path (load_from, --resume or '
            f'the backbone\'s init_cfg checkpoint); for an official ImageNet checkpoint, download '
            f'it (docs/model_zoo.md, "Checkpoints", says where each lives) and put it at that '
            f'path, or set the backbone\'s init_cfg=None to start from random weights.')
    try:
        if local:
            return safe_torch_load(filename, map_location)
        with checkpoint_safe_globals():  # another scheme (s3://, ...): mmengine's loader
            return CheckpointLoader.load_checkpoint(filename, map_location=map_location)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'refused to load {source!r}: it contains pickled objects that are not plain '
            f'tensors or known checkpoint metadata, and loading them could run code. mmhat '
            f'unpickles only those (torch.load(weights_only=True) with an allow-list, or the '
            f'same allow-list in a restricted unpickler on torch < 2.5). If you trust the file, '
            f'load it yourself, save its state_dict and load that. Detail: '
            f'{_refusal_detail(e)}') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(
            f'cannot read checkpoint {source!r}: the file looks truncated or corrupt '
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


def select_state_dict(state_dict: StateDict, rules: Sequence[RenameRule]) -> StateDict:
    """The keys of ``state_dict`` that match one of ``rules``' patterns, renamed by all of
    them in order: the part of a checkpoint that belongs to one module (e.g. an official
    classifier's keys, renamed to a head's). A pure function; other keys are left out."""
    return {_rename(key, rules): value for key, value in state_dict.items()
            if any(re.search(pattern, key) for pattern, _ in rules)}


def _summarise(keys: List[str], limit: int = 8) -> str:
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


#: Cheap signatures of the checkpoints users load by mistake, tried in order on the keys of a
#: checkpoint that shares (almost) no key with the model: ``(regex searched in the keys, what
#: it is, what to do)``. The mmhat families' official layouts come first.
KNOWN_LAYOUTS: Sequence[Tuple[str, str, str]] = (
    (r'^(conv_stem|groupmixformer_backbone)\.', 'an official GroupMixFormer checkpoint',
     "load it with type='mmhat.GroupMixFormer'"),
    (r'^patch_embed1\.conv\.', 'an official Shunted Transformer checkpoint',
     "load it with type='mmhat.ShuntedTransformer'"),
    (r'^(ds\d|blocks\.\d+\.\d+)\.', 'an official HAT-Net or TransCNN checkpoint',
     "load it with type='mmhat.HATNet' or 'mmhat.TransCNN'"),
    (r'relative_position_bias_table|patches_resolution|\.w_msa\.', 'a Swin Transformer', ''),
    (r'^downsample_layers\.', 'a ConvNeXt', ''),
    (r'^(layer[1-4]\.\d+\.(conv|bn)|res[2-5]\.)', 'a ResNet (keys conv1/stem, layer1-4)', ''),
    (r'^(patch_embed\d\.proj|block\d\.\d+\.attn\.sr)\.', 'a PVT', ''),
    (r'^(cls_token|dist_token)$', 'a ViT/DeiT', ''),
)


def guess_layout(keys: Iterable[str]) -> Optional[Tuple[str, str]]:
    """``(what, fix)`` of the first :data:`KNOWN_LAYOUTS` row some key matches, else None."""
    keys = list(keys)
    for pattern, what, fix in KNOWN_LAYOUTS:
        if any(re.search(pattern, k) for k in keys):
            return what, fix
    return None


def foreign_keys_diagnosis(model: nn.Module, keys: Sequence[str]) -> Optional[Tuple[str, str]]:
    """``(what the checkpoint looks like, the fix)`` for a state dict that shares (almost) no
    key with ``model``; None when a tenth of the model's keys or more are in it (then it is
    this family's, of another variant or damaged, and the key report says what differs)."""
    own = model.state_dict()
    if sum(k in own for k in keys) >= 0.1 * len(own):
        return None
    family = type(model).__name__
    guess = guess_layout(keys)
    native = tuple(getattr(model, 'native_prefixes', ()))
    if guess:
        looks = f'look like {guess[0]}'
    elif native and all(k.startswith(native) for k in keys):
        looks = 'are in mmhat\'s layout but of another family (check `type`)'
    else:
        looks = f'match no layout of {family}'
    if guess and guess[1]:  # another mmhat family's official file
        fix = f'{guess[1][0].upper()}{guess[1][1:]}. {_own_weights_fix(family)}'
    else:
        fix = (f'If a base config put it there: {_MMSEG_ORIGIN}; {_MMDET_ORIGIN}. '
               f'{_own_weights_fix(family)}')
    return f'its keys {looks}, not an mmhat or official {family} checkpoint.', fix


def load_state_dict_strict(model: nn.Module, state_dict: StateDict, source: str = '',
                           hint: str = '') -> None:
    """``model.load_state_dict(strict=True)`` with an error that names the problem keys.

    Raises:
        CheckpointError: listing missing keys, unexpected keys and shape mismatches
            (first keys of each, with shapes), plus ``hint``; for the checkpoint of another
            model, which model it looks like and the fix (:func:`foreign_keys_diagnosis`).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        diagnosis = foreign_keys_diagnosis(model, list(state_dict))
        lines = [f'checkpoint {source!r} does not fit {type(model).__name__}:'
                 + (f' {diagnosis[0]}' if diagnosis else '')]
        if mismatched:
            lines.append(f'  {len(mismatched)} shape mismatches: {_summarise(mismatched, 4)}')
        if missing:
            lines.append(f'  {len(missing)} missing keys: {_summarise(missing)}')
        if unexpected:
            lines.append(f'  {len(unexpected)} unexpected keys: {_summarise(unexpected)}')
        if hint:
            lines.append(f'  {hint}')
        if diagnosis:
            lines.append(f'  Fix: {diagnosis[1]}')
        raise CheckpointError('\n'.join(lines))
    model.load_state_dict(state_dict, strict=True)
