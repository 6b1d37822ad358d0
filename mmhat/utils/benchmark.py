"""Speed, memory and FLOP efficiency of backbones, measured against peers in one run.

The library behind ``tools/benchmark.py`` (CPU or GPU tables, many sizes) and
``tools/gpu_check.py`` (one prepared CUDA run): what to measure is a list of :class:`Row`,
each measured into a :class:`Result`; :func:`pairs` sets results against their references
along one or more axes (fused vs explicit attention, with_cp vs plain, a peer, ...), and
:func:`markdown_table` renders any list of records.

What a row measures:

* latency: median over ``runs`` timed passes after ``warmup`` passes (CUDA events on a GPU);
  throughput = images / median latency;
* peak memory: on CUDA ``max_memory_allocated`` above what was allocated before the pass; on
  CPU the rise of the process's peak resident set (VmHWM, reset through
  ``/proc/self/clear_refs``) during the first pass of a fresh process in which glibc was told
  from start-up to ``mmap`` every block of 128 KiB or more, so that freed tensors leave RSS at
  once and the figure follows the live tensors. The timed passes of a CPU row run in a
  process of their own with the allocator as users have it (after such an allocator change
  they ran up to 1.6x slower), so a CPU row takes two fresh processes (``isolate``);
* mode ``infer``: a forward under ``torch.inference_mode``; mode ``train``: forward, then
  backward of the sum of every output (the backbone's share of a detector's step); with
  ``precision`` ``'fp16'`` the backward goes through a ``GradScaler`` as mixed-precision
  training does;
* precision: ``'fp32'`` (TF32 off), ``'tf32'`` (float32 with TF32 matmuls and convolutions,
  CUDA), ``'bf16'`` / ``'fp16'`` (autocast);
* FLOPs as :mod:`mmhat.utils.flops` counts them (one fused multiply-add = one FLOP), divided
  by the latency, as a fraction of a plain ``n x n @ n x n`` matmul on the same device in the
  same run and precision (:func:`matmul_rate`).

CPU timings on a shared machine: one torch thread by default, ``OMP_WAIT_POLICY=PASSIVE``
(spin-waiting OpenMP threads make a contended 2-thread job ~100x slower), and every row
records how much CPU other processes took while it ran ("foreign cores", from /proc/stat).
Compare models by ratios of rows measured in the same run, never by absolute times from
other runs; compare models each alone in its process (``measure_rows(interleave='alone')``),
as users run them: models sharing a process share its heap and read up to 30% apart.
"""
import contextlib
import ctypes
import dataclasses
import gc
import inspect
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from mmhat import compat

#: fewest timed passes a row keeps even when it exceeds ``max_seconds``
MIN_RUNS = 3
#: autocast dtypes of the precisions
AUTOCAST = {'bf16': torch.bfloat16, 'fp16': torch.float16}

#: peers: key -> (label, mmdet config, timm model name and arguments). mmdet's settings are
#: those of its own detection configs (Swin-T ``mask-rcnn_swin-t-p4-w7``, PVTv2
#: ``retinanet_pvtv2-b1/b2``, ResNet-50), except that every backbone trains all of its
#: stages (no ``frozen_stages``, no ``norm_eval``), so training figures compare
#: architectures, not freezing recipes. timm's are used where mmdet is not installed.
PEERS: Dict[str, Tuple[str, dict, Tuple[str, dict]]] = {
    'swin-t': ('Swin-T', dict(type='mmdet.SwinTransformer', embed_dims=96, depths=[2, 2, 6, 2],
                              num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4,
                              qkv_bias=True, drop_path_rate=0.2, patch_norm=True,
                              out_indices=(0, 1, 2, 3)),
               ('swin_tiny_patch4_window7_224', dict(strict_img_size=False,
                                                     drop_path_rate=0.2))),
    'pvtv2-b1': ('PVTv2-B1', dict(type='mmdet.PyramidVisionTransformerV2', embed_dims=64,
                                  num_layers=[2, 2, 2, 2]), ('pvt_v2_b1', {})),
    'pvtv2-b2': ('PVTv2-B2', dict(type='mmdet.PyramidVisionTransformerV2', embed_dims=64,
                                  num_layers=[3, 4, 6, 3]), ('pvt_v2_b2', {})),
    'r50': ('ResNet-50', dict(type='mmdet.ResNet', depth=50, frozen_stages=-1,
                              norm_eval=False), ('resnet50', {})),
}


# ---------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """A model to measure: how to build it and what it can do."""
    key: str
    label: str
    cfg: Dict[str, Any]
    type: str
    arch: Optional[str] = None
    is_mmhat: bool = False
    supports_cp: bool = False
    switchable_attn: bool = False
    #: mmhat's training kernels the family has (:data:`KERNEL_FEATURES`), which rows can
    #: switch off (``kernels='plain'``: all; ``'no-<feature>'``: one)
    kernel_features: Tuple[str, ...] = ()
    source: str = 'mmhat'  # 'mmhat', 'mmdet' (registry) or 'timm'


@dataclass
class Row:
    """One measurement to take."""
    model: ModelSpec
    size: Tuple[int, int]
    mode: str = 'infer'  # 'infer' or 'train'
    attn: Optional[str] = None  # 'fused' / 'explicit' for families with both paths
    layout: Optional[str] = None  # 'channels_last' / 'nchw' for mmhat backbones
    kernels: Optional[str] = None  # 'mmhat' / 'plain' / 'no-<feature>' (ModelSpec.kernel_features)
    with_cp: bool = False
    compile: bool = False
    precision: str = 'fp32'
    batch: int = 1
    threads: int = 1
    device: str = 'cpu'
    runs: int = 5
    warmup: int = 1
    max_seconds: float = 60.0
    flops: bool = False  # count FLOPs in this row (once per model and size)
    phase: str = 'all'  # 'all', or 'time' / 'memory' when a CPU row takes two processes

    def describe(self) -> str:
        parts = [self.model.label, fmt_size(self.size), self.mode, self.precision]
        parts += [p for p in (self.attn, 'NCHW' if self.layout == 'nchw' else None,
                              None if self.kernels in (None, 'mmhat') else f'{self.kernels} kernels',
                              'with_cp' if self.with_cp else None,
                              'compiled' if self.compile else None) if p]
        return ' '.join(parts)


@dataclass
class Result:
    """What a :class:`Row` measured (``error`` set instead when it failed)."""
    model: str
    model_key: str
    model_type: str
    arch: Optional[str]
    size: List[int]
    mode: str
    attn: Optional[str]
    layout: Optional[str]
    with_cp: bool
    compile: bool
    precision: str
    batch: int
    threads: int
    device: str
    runs: int
    warmup: int
    phase: str
    kernels: Optional[str] = None
    latency_s: Optional[float] = None
    latency_all_s: List[float] = field(default_factory=list)
    throughput: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    mem_method: Optional[str] = None
    params_m: Optional[float] = None
    gflops: Optional[float] = None
    achieved_gflops_per_s: Optional[float] = None
    matmul_fraction: Optional[float] = None
    compile_s: Optional[float] = None
    foreign_cores: Optional[float] = None
    foreign_cores_all: List[Optional[float]] = field(default_factory=list)
    own_cpu_share: Optional[float] = None
    attempts: int = 1
    #: timed in one process with other rows (the other kernel configurations of its model,
    #: or other models too), alternating step by step (:func:`measure_interleaved`)
    interleaved: bool = False
    #: with several processes per interleaved group (``measure_rows(processes=N)``): each
    #: process's median; ``latency_s`` is their median
    latency_by_process_s: List[float] = field(default_factory=list)
    error: Optional[str] = None

    @classmethod
    def of(cls, row: Row, **measured) -> 'Result':
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(model=row.model.label, model_key=row.model.key, model_type=row.model.type,
                   arch=row.model.arch, size=list(row.size), mode=row.mode, attn=row.attn,
                   layout=row.layout, kernels=row.kernels, with_cp=row.with_cp,
                   compile=row.compile, precision=row.precision, batch=row.batch, threads=row.threads,
                   device=row.device, runs=row.runs, warmup=row.warmup, phase=row.phase,
                   **{k: v for k, v in measured.items() if k in known})

    @property
    def ok(self) -> bool:
        return self.error is None and self.latency_s is not None

    def path(self) -> str:
        """The attention path, NCHW weights, plain kernels and torch.compile of the row, in
        words."""
        return ((self.attn or '—') + (', NCHW' if self.layout == 'nchw' else '') +
                ('' if self.kernels in (None, 'mmhat') else f', {self.kernels} kernels') +
                (' + compile' if self.compile else ''))

    def is_default_path(self) -> bool:
        """The model as users get it: fused attention where there is a choice,
        channels-last weights and mmhat's training kernels for mmhat models, eager."""
        return (self.attn in ('fused', None) and self.layout in ('channels_last', None)
                and self.kernels in ('mmhat', None) and not self.compile)


def fmt_size(hw: Sequence[int]) -> str:
    return f'{hw[0]}x{hw[1]}'


def parse_size(text: str) -> Tuple[int, int]:
    """``'224'`` -> (224, 224); ``'800x1333'`` -> (H=800, W=1333)."""
    import argparse
    parts = text.lower().replace('*', 'x').split('x')
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        hw = ()
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 1:
        raise argparse.ArgumentTypeError(f'a size is N or HxW (height first), got {text!r}')
    return hw  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# Machine state
# ---------------------------------------------------------------------------------------
def _busy_jiffies() -> Optional[int]:
    """CPU time (all cores, clock ticks) spent busy since boot; None off Linux."""
    try:
        with open('/proc/stat') as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return user + nice + system + irq + softirq + steal


class CpuSample:
    """Wall time, the machine's busy CPU time and this process's own CPU time, at once."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.busy = _busy_jiffies()
        self.own = time.process_time()

    def foreign_cores(self, later: 'CpuSample') -> Optional[float]:
        """Cores other processes kept busy between ``self`` and ``later`` (1.0 = one core)."""
        wall = later.wall - self.wall
        if self.busy is None or later.busy is None or wall <= 0:
            return None
        busy = (later.busy - self.busy) / os.sysconf('SC_CLK_TCK')
        return max(0.0, (busy - (later.own - self.own)) / wall)

    def own_share(self, later: 'CpuSample') -> float:
        """CPU this process got per second of wall time: ~threads on a free machine, less
        when the scheduler time-slices it with other work (the direct sign of contention)."""
        return (later.own - self.own) / max(later.wall - self.wall, 1e-9)


def load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: str, threads: int) -> Dict[str, Any]:
    """What a reader needs to judge the numbers: device, software, threads, load."""
    info: Dict[str, Any] = dict(
        device=device, torch=torch.__version__, python=platform.python_version(),
        threads=threads, cpu_count=os.cpu_count(),
        omp_wait_policy=os.environ.get('OMP_WAIT_POLICY'), load_average_start=load_average())
    if device.startswith('cuda'):
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        info.update(device_name=torch.cuda.get_device_name(dev), cuda=torch.version.cuda,
                    capability='.'.join(map(str, torch.cuda.get_device_capability(dev))),
                    memory_gb=round(props.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
    else:
        info['device_name'] = platform.processor() or platform.machine()
        try:
            with open('/proc/cpuinfo') as f:
                names = [ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')]
            info['device_name'] = names[0] if names else info['device_name']
        except OSError:
            pass
    for pkg in ('mmdet', 'mmseg', 'mmengine', 'mmcv', 'timm'):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # a missing optional package only blanks its version
            info[pkg] = None
    return info


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------
def _mmdet_importable() -> bool:
    try:
        import mmdet.models  # noqa: F401  (registers the peers under the mmdet scope)
        return True
    except Exception:  # no mmdet, or no compiled mmcv ops
        return False


def _accepts(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` takes keyword ``name``, following ``**kwargs`` up the MRO (mmdet's
    PVTv2 forwards everything to PVT)."""
    for klass in cls.__mro__:
        if '__init__' not in vars(klass):
            continue
        params = inspect.signature(vars(klass)['__init__']).parameters
        if name in params:
            return True
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return False
    return False


def peer_spec(key: str) -> ModelSpec:
    """A peer, from mmdet's registry if mmdet is importable, else from timm."""
    label, mmdet_cfg, (timm_name, timm_kwargs) = PEERS[key]
    if _mmdet_importable():
        from mmhat.registry import MODELS
        cls = MODELS.get(mmdet_cfg['type'])
        return ModelSpec(key=key, label=label, cfg=dict(mmdet_cfg), type=mmdet_cfg['type'],
                         supports_cp=_accepts(cls, 'with_cp'), source='mmdet')
    return ModelSpec(key=key, label=label, cfg=dict(name=timm_name, **timm_kwargs),
                     type=f'timm.{timm_name}', supports_cp=True, source='timm')


def mmhat_spec(type_name: str, arch: Optional[str] = None) -> ModelSpec:
    """A registered mmhat backbone; without ``arch`` its ``smallest_arch``."""
    import mmhat.models  # noqa: F401
    from mmhat.registry import MODELS
    cls = MODELS.get(type_name)
    if cls is None or not hasattr(cls, 'arch_zoo'):
        names = ', '.join(f'mmhat.{n}' for n in sorted(MODELS.module_dict))
        raise ValueError(f'unknown backbone {type_name!r}; registered mmhat types: {names}; '
                         f'peers: {", ".join(PEERS)}')
    arch = (arch or cls.smallest_arch).lower()
    if arch not in cls.arch_zoo:
        raise ValueError(f'unknown arch {arch!r} for {type_name}; valid: '
                         f'{", ".join(cls.arch_zoo)}')
    label = f'{cls.__name__}-{arch}'
    return ModelSpec(key=label, label=label, cfg=dict(type=f'mmhat.{cls.__name__}', arch=arch),
                     type=f'mmhat.{cls.__name__}', arch=arch, is_mmhat=True, supports_cp=True,
                     switchable_attn=cls.fused_attention,
                     kernel_features=family_kernel_features(cls))


def config_spec(path: str) -> ModelSpec:
    """The backbone of an mmdet/mmseg config file, as configured (drop path, with_cp, ...),
    without its pretrained weights and with BN for SyncBN (one process)."""
    from mmengine.config import Config
    if not Path(path).is_file():
        raise ValueError(f'config file {path!r} not found')
    backbone = Config.fromfile(path).get('model', {}).get('backbone')
    if not backbone:
        raise ValueError(f'{path} has no model.backbone to measure')
    cfg = backbone.to_dict()
    for key in ('init_cfg', 'pretrained', '_delete_'):  # measure the architecture only
        cfg.pop(key, None)
    if (cfg.get('norm_cfg') or {}).get('type') == 'SyncBN':
        cfg['norm_cfg'] = dict(cfg['norm_cfg'], type='BN')
    type_name = cfg['type']
    if type_name.startswith('mmhat.'):
        base = mmhat_spec(type_name, cfg.get('arch') if isinstance(cfg.get('arch'), str)
                          else None)
        return dataclasses.replace(base, key=Path(path).stem, label=Path(path).stem, cfg=cfg,
                                   arch=cfg.get('arch') if isinstance(cfg.get('arch'), str)
                                   else None)
    from mmhat.registry import MODELS
    if not _mmdet_importable() or MODELS.get(type_name) is None:
        raise ValueError(f'{path}: backbone type {type_name!r} is not registered')
    return ModelSpec(key=Path(path).stem, label=Path(path).stem, cfg=cfg, type=type_name,
                     supports_cp=_accepts(MODELS.get(type_name), 'with_cp'), source='mmdet')


def resolve_model(token: str, default_arch: Optional[str] = None) -> ModelSpec:
    """A model argument -> its :class:`ModelSpec`: a peer key (``swin-t``, ``pvtv2-b2``, ...),
    a registered type with an optional ``:arch`` (``mmhat.HATNet:tiny``) or a config file."""
    if token.endswith('.py'):
        return config_spec(token)
    if token.lower() in PEERS:
        return peer_spec(token.lower())
    type_name, _, arch = token.partition(':')
    return mmhat_spec(type_name, arch or default_arch)


def build_model(spec: ModelSpec, with_cp: bool = False,
                channels_last: Optional[bool] = None) -> torch.nn.Module:
    """The model of ``spec``, random init, with activation checkpointing if asked; an mmhat
    backbone's ``channels_last`` where given (None: its default)."""
    if spec.source == 'timm':
        import timm
        cfg = dict(spec.cfg)
        model = timm.create_model(cfg.pop('name'), pretrained=False, features_only=True,
                                  **cfg)
        if with_cp:
            model.set_grad_checkpointing(True)
        return model
    import mmhat.models  # noqa: F401
    from mmhat.registry import MODELS
    cfg = dict(spec.cfg)
    if with_cp or 'with_cp' in cfg:  # a config's own with_cp follows the row too
        cfg['with_cp'] = with_cp
    if spec.is_mmhat and channels_last is not None:
        cfg['channels_last'] = channels_last
    return MODELS.build(cfg)


# ---------------------------------------------------------------------------------------
# Measuring one row (in this process, or in a worker subprocess)
# ---------------------------------------------------------------------------------------
#: glibc ``mallopt`` parameter number of ``M_MMAP_THRESHOLD``.
_M_MMAP_THRESHOLD = -3


def _set_mmap_threshold(nbytes: int) -> bool:
    """Serve allocations of ``nbytes`` or more by ``mmap`` (glibc only; False elsewhere).

    With glibc's default (dynamic, up to 32 MiB) threshold, freed activations stay in the
    heap and later ones reuse them, so how far RSS rises depends on the allocation order
    and varied by +-15% between identical runs. Mapped blocks go back to the system when
    freed, so during the memory pass RSS follows the live tensors.
    """
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False


def _reset_peak_rss() -> str:
    """Reset VmHWM to the current RSS; returns the method that will read the peak."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return 'VmHWM'
    except OSError:
        return 'ru_maxrss'


def _status_kb(name: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(name + ':'):
                return int(line.split()[1])
    raise KeyError(name)


def _rss_kb(method: str) -> int:
    if method == 'VmHWM':
        return _status_kb('VmRSS')
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def _peak_kb(method: str) -> int:
    if method == 'VmHWM':
        return _status_kb('VmHWM')
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call; CUDA events around it on a GPU (the launch is asynchronous)."""
    if device.type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        fn()
        end.record()
        sync(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_runs(fn: Callable[[], Any], device: torch.device, runs: int,
               max_seconds: float) -> Dict[str, Any]:
    """Run ``fn`` up to ``runs`` times (at least ``MIN_RUNS`` when time runs out)."""
    times, foreign, share = [], [], []
    start = time.perf_counter()
    for i in range(runs):
        before = CpuSample()
        times.append(time_once(fn, device))
        after = CpuSample()
        foreign.append(before.foreign_cores(after))
        share.append(before.own_share(after))
        if i + 1 >= min(runs, MIN_RUNS) and time.perf_counter() - start > max_seconds:
            break
    known = [f for f in foreign if f is not None]
    return dict(latency_s=statistics.median(times), latency_all_s=times,
                foreign_cores=statistics.median(known) if known else None,
                foreign_cores_all=foreign, own_cpu_share=statistics.median(share))


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device):
    """Autocast for ``'bf16'`` / ``'fp16'``; TF32 on (``'tf32'``) or off (``'fp32'``) for
    CUDA float32 matmuls and convolutions. The previous settings are restored."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = precision == 'tf32'
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        if precision in AUTOCAST:
            with compat.autocast(device.type, AUTOCAST[precision]):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def attention_path(attn: Optional[str]):
    """The process-wide default attention path of mmhat's families, for the block."""
    from mmhat.models.layers import set_fused_attn, use_fused_attn
    before = use_fused_attn()
    if attn is not None:
        set_fused_attn(attn == 'fused')
    try:
        yield
    finally:
        set_fused_attn(before)


def _kernel_switches() -> Dict[str, Tuple[Callable[[bool], None], Callable[[], bool]]]:
    from mmhat.models import layers as L
    return {'conv': (L.set_cpu_kernels, L.use_cpu_kernels),
            'act-recompute': (L.set_act_recompute, L.use_act_recompute),
            'window-copies': (L.set_window_copies, L.use_window_copies),
            'norm-fold': (L.set_norm_fold, L.use_norm_fold),
            'attn-replay': (L.set_attention_replay, L.use_attention_replay)}


#: mmhat's training kernels, each with its process-wide switch in ``mmhat.models.layers``:
#: ``conv``: the CPU convolutions of ``layers.conv`` (off: ``nn.Conv2d`` / ``F.conv2d``);
#: ``act-recompute``: ``act_then_conv`` (off: autograd keeps the activation);
#: ``window-copies``: windows cut and merged in one copy each way (``layers.window_qkv`` /
#: ``merge_windows``; off: pad, views and reshapes); ``norm-fold``: a training-mode
#: BatchNorm folded into the expanding 1x1 conv before it (``layers.pointwise_then_norm``;
#: off: the conv, then the norm);
#: ``attn-replay``: ``with_cp`` replays the fused attention and the kept linear products
#: (off: the whole block is recomputed)
KERNEL_FEATURES = ('conv', 'act-recompute', 'window-copies', 'norm-fold', 'attn-replay')


def family_kernel_features(cls) -> Tuple[str, ...]:
    """The training kernels a backbone class uses, from its declared facts."""
    return ((('conv', 'act-recompute') if cls.cpu_conv_kernels else
             ('conv',) if cls.depthwise_kernels else ())
            + (('window-copies',) if cls.windowed_attention else ())
            + (('norm-fold',) if cls.folded_norms else ())
            + (('attn-replay',) if cls.fused_attention or cls.cp_keeps_products else ()))


@contextlib.contextmanager
def train_kernels(kernels: Optional[str]):
    """mmhat's training kernels for the block: ``'mmhat'`` all of them, ``'plain'`` none,
    ``'no-<feature>'`` all but one of :data:`KERNEL_FEATURES`; None leaves them as they are."""
    switches = _kernel_switches()
    before = {name: use() for name, (_, use) in switches.items()}
    if kernels is not None:
        if kernels not in ('mmhat', 'plain') and not (kernels.startswith('no-')
                                                      and kernels[3:] in switches):
            raise ValueError(f'unknown kernels {kernels!r}: mmhat, plain or no-<feature> with '
                             f'a feature of {", ".join(KERNEL_FEATURES)}')
        for name, (set_, _) in switches.items():
            set_(kernels == 'mmhat' or (kernels.startswith('no-') and kernels[3:] != name))
    try:
        yield
    finally:
        for name, (set_, _) in switches.items():
            set_(before[name])


@contextlib.contextmanager
def row_paths(row: 'Row'):
    """The attention path and conv kernels of ``row``, for the block."""
    with attention_path(row.attn), train_kernels(row.kernels):
        yield


def output_loss(outs: Sequence[torch.Tensor]) -> torch.Tensor:
    """One scalar that depends on every output, so that backward reaches every stage."""
    return sum(o.float().square().mean() for o in outs)


def make_step(model: torch.nn.Module, net: Callable, x: torch.Tensor, mode: str,
              precision: str) -> Callable[[], Any]:
    """One inference pass or one training step (forward + backward) of ``net``."""
    device = x.device
    if mode == 'train':
        scaler = compat.grad_scaler(device.type) if precision == 'fp16' else None

        def step():
            with precision_context(precision, device):
                loss = output_loss(net(x))
            (scaler.scale(loss) if scaler is not None else loss).backward()
            model.zero_grad(set_to_none=True)
        return step

    def step():
        with torch.inference_mode(), precision_context(precision, device):
            net(x)
    return step


def prepare(row: Row) -> Tuple[torch.nn.Module, torch.Tensor]:
    """The row's model (on its device, layout and mode) and input batch."""
    device = torch.device(row.device)
    # 'nchw': the reference layout, NCHW conv weights as the official models store them
    model = build_model(row.model, row.with_cp,
                        channels_last=False if row.layout == 'nchw' else None).to(device)
    model.train(row.mode == 'train')
    H, W = row.size
    x = torch.randn(row.batch, 3, H, W, generator=torch.Generator().manual_seed(0)).to(device)
    return model, x


def measure(row: Row, matmul_gflops_per_s: Optional[float] = None) -> Result:
    """Build the row's model and measure it here (see the module docstring)."""
    torch.set_num_threads(row.threads)
    exact = False
    if row.phase == 'memory':
        # Before anything is allocated, so that the heap never holds a large freed block.
        exact = _set_mmap_threshold(128 * 1024)
    device = torch.device(row.device)
    with row_paths(row):
        model, x = prepare(row)
        # torch.compile (inductor) wraps the module; parameters, and so the backward, are shared.
        net = torch.compile(model) if row.compile else model
        step = make_step(model, net, x, row.mode, row.precision)
        measured: Dict[str, Any] = dict(
            params_m=sum(p.numel() for p in model.parameters()) / 1e6)
        if row.compile:
            # Compilation is a one-time cost: paid before the measured passes, and reported.
            t0 = time.perf_counter()
            step()
            sync(device)
            measured['compile_s'] = time.perf_counter() - t0
        if row.phase in ('all', 'time'):
            for _ in range(row.warmup):
                step()
            measured.update(timed_runs(step, device, row.runs, row.max_seconds))
        if row.phase in ('all', 'memory'):
            measured.update(_peak_memory(step, device, compiled=row.compile, exact=exact))
    if row.flops:
        from mmhat.utils.flops import model_flops
        measured['gflops'] = model_flops(model, row.size)['gflops'] * row.batch
    result = Result.of(row, **measured)
    if result.latency_s:
        result.throughput = row.batch / result.latency_s
        if result.gflops is not None and matmul_gflops_per_s:
            add_rate(result, matmul_gflops_per_s)
    return result


#: ``--interleave`` modes: what the rows that one process times together may differ in
INTERLEAVE_ACROSS: Dict[str, Tuple[str, ...]] = {
    'kernels': ('kernels',),
    'models': ('model', 'attn', 'layout', 'kernels', 'with_cp'),
}


def interleave_key(row: Row, across: str = 'kernels') -> str:
    """What rows that :func:`measure_interleaved` may time together share: everything but
    the fields of :data:`INTERLEAVE_ACROSS` ``[across]`` (and the phase / FLOP bookkeeping)."""
    if across not in INTERLEAVE_ACROSS:
        raise ValueError(f'unknown interleave mode {across!r}: one of '
                         f'{", ".join(INTERLEAVE_ACROSS)}')
    data = dataclasses.asdict(row)
    for k in INTERLEAVE_ACROSS[across] + ('phase', 'flops'):
        data.pop(k)
    return json.dumps(data, sort_keys=True, default=str)


def measure_interleaved(rows: Sequence[Row], across: str = 'kernels') -> List[Result]:
    """Time rows here that differ only in the fields of :data:`INTERLEAVE_ACROSS`
    ``[across]`` (``'kernels'``: one model's training kernels; ``'models'``: also the model,
    its attention path, weight layout and ``with_cp``), alternating them step by step (run
    ``i`` starts at row ``i``); rows of one model and ``with_cp`` share it.

    Separate processes differ by up to ~10% for the same code (heap state, page placement),
    a peer's row by up to 25% between runs; within one process, alternating steps share the
    state and the machine's drift, so a change of a few percent shows, between kernels or
    between models. Peak memory is not measured here (it needs a fresh process per row)."""
    if len({interleave_key(r, across) for r in rows}) != 1:
        raise ValueError('interleaved rows must differ in their '
                         f'{" / ".join(INTERLEAVE_ACROSS[across])} only')
    if len({interleave_key(r, 'kernels') + str(r.kernels) for r in rows}) != len(rows):
        raise ValueError('interleaved rows must differ from each other')
    first = rows[0]
    torch.set_num_threads(first.threads)
    device = torch.device(first.device)
    built: Dict[str, Tuple[torch.nn.Module, torch.Tensor]] = {}
    steps, params_m, gflops = [], [], []
    for row in rows:
        # the model, its weight layout and with_cp (set when it is built); attention path and
        # kernels are switched per step
        key = json.dumps([dataclasses.asdict(row.model), row.layout, row.with_cp],
                         sort_keys=True, default=str)
        if key not in built:
            with row_paths(row):
                built[key] = prepare(row)
        model, x = built[key]
        steps.append(make_step(model, model, x, row.mode, row.precision))
        params_m.append(sum(p.numel() for p in model.parameters()) / 1e6)
        if row.flops:
            from mmhat.utils.flops import model_flops
            gflops.append(model_flops(model, row.size)['gflops'] * row.batch)
        else:
            gflops.append(None)
    times: List[List[float]] = [[] for _ in rows]
    foreign: List[List[Optional[float]]] = [[] for _ in rows]
    share: List[List[float]] = [[] for _ in rows]
    for row, step in zip(rows, steps):
        with row_paths(row):
            for _ in range(row.warmup):
                step()
    for run in range(first.runs):
        for j in range(len(rows)):
            i = (run + j) % len(rows)
            with row_paths(rows[i]):
                before = CpuSample()
                times[i].append(time_once(steps[i], device))
                after = CpuSample()
            foreign[i].append(before.foreign_cores(after))
            share[i].append(before.own_share(after))
    results = []
    for i, row in enumerate(rows):
        known = [f for f in foreign[i] if f is not None]
        latency = statistics.median(times[i])
        results.append(Result.of(
            row, params_m=params_m[i], latency_s=latency, throughput=row.batch / latency,
            latency_all_s=times[i], foreign_cores=statistics.median(known) if known else None,
            foreign_cores_all=foreign[i], own_cpu_share=statistics.median(share[i]),
            gflops=gflops[i], interleaved=True))
    return results


#: operator name -> the kind of work it is, for the profile's summary (first match wins)
OP_KINDS: Sequence[Tuple[str, Tuple[str, ...]]] = (
    ('attention', ('scaled_dot_product', '_flash_attention', '_efficient_attention', 'softmax',
                   '_softmax', 'baddbmm', 'bmm')),
    ('convolution', ('conv', 'mkldnn_convolution', 'thnn_conv', 'slow_conv')),
    ('matmul / linear', ('addmm', 'mm', 'linear', 'matmul')),
    ('normalisation', ('norm', 'batch_norm', 'group_norm', 'layer_norm')),
    ('layout copies', ('copy_', 'clone', 'contiguous', 'to_dense', 'permute', 'transpose',
                       'cat', 'stack', 'pad', 'constant_pad', 'reflection_pad', 'narrow',
                       'slice', 'unfold', 'col2im', 'im2col', 'chunk', 'split', 'index')),
    ('pooling', ('pool', 'adaptive_avg')),
    ('element-wise', ('add', 'mul', 'sub', 'div', 'gelu', 'relu', 'silu', 'hardswish', 'sigmoid',
                      'tanh', 'exp', 'fill_', 'zero_', 'where', 'masked', 'sum', 'mean',
                      'threshold', 'neg', 'sqrt', 'rsqrt', 'pow')),
)


def op_kind(name: str) -> str:
    """The kind of an operator (:data:`OP_KINDS`), from its profiler name."""
    base = name.split('::')[-1].lower()
    for kind, needles in OP_KINDS:
        if any(n in base for n in needles):
            return kind
    return 'other'


def profile_train_step(row: Row, top: int = 12) -> Dict[str, Any]:
    """One training step (forward + backward) of ``row``'s model under ``torch.profiler``,
    after ``row.warmup`` unprofiled steps: self CPU time per operator, split into forward and
    backward (by the time range of each phase), the kinds of work (:func:`op_kind`) and the
    memory each operator allocates. Shares are of the step's total self time."""
    from torch.profiler import ProfilerActivity, profile, record_function
    torch.set_num_threads(row.threads)
    with row_paths(row):
        model, x = prepare(row)
        for _ in range(max(1, row.warmup)):
            output_loss(model(x)).backward()
            model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function('mmhat::forward'):
                loss = output_loss(model(x))
            with record_function('mmhat::backward'):
                loss.backward()
        model.zero_grad(set_to_none=True)
    events = list(prof.events())
    phases = {e.name: (e.time_range.start, e.time_range.end) for e in events
              if e.name in ('mmhat::forward', 'mmhat::backward')}
    b_start, b_end = phases['mmhat::backward']
    by_op: Dict[Tuple[str, str], Dict[str, float]] = {}
    totals = {'forward': 0.0, 'backward': 0.0}
    kinds: Dict[Tuple[str, str], float] = {}
    for e in events:
        if e.name.startswith('mmhat::') or e.self_cpu_time_total <= 0 and not e.cpu_memory_usage:
            continue
        phase = 'backward' if b_start <= e.time_range.start < b_end else 'forward'
        name = e.name
        if name.startswith('autograd::engine::evaluate_function: '):
            name = name[len('autograd::engine::evaluate_function: '):]
        entry = by_op.setdefault((name, phase), dict(self_ms=0.0, calls=0, mem_mb=0.0))
        entry['self_ms'] += e.self_cpu_time_total / 1e3
        entry['calls'] += 1
        entry['mem_mb'] += max(e.self_cpu_memory_usage, 0) / 2**20
        totals[phase] += e.self_cpu_time_total / 1e3
        kind = op_kind(name)
        kinds[(kind, phase)] = kinds.get((kind, phase), 0.0) + e.self_cpu_time_total / 1e3
    total = sum(totals.values())
    ops = sorted(({'op': k[0], 'phase': k[1], **v, 'share': v['self_ms'] / total}
                  for k, v in by_op.items()), key=lambda r: -r['self_ms'])
    return dict(model=row.model.label, size=fmt_size(row.size), batch=row.batch,
                threads=row.threads, attn=row.attn, layout=row.layout, kernels=row.kernels,
                with_cp=row.with_cp,
                total_ms=total, forward_ms=totals['forward'], backward_ms=totals['backward'],
                top=ops[:top],
                kinds=sorted(({'kind': k[0], 'phase': k[1], 'self_ms': v, 'share': v / total}
                              for k, v in kinds.items()), key=lambda r: -r['self_ms']),
                top_memory=sorted(ops, key=lambda r: -r['mem_mb'])[:5])


def _peak_memory(step: Callable[[], Any], device: torch.device, compiled: bool,
                 exact: bool) -> Dict[str, Any]:
    """The peak memory of one more pass above what was allocated before it."""
    gc.collect()
    if device.type == 'cuda':
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return dict(peak_mem_mb=(torch.cuda.max_memory_allocated(device) - base) / 2**20,
                    mem_method='cuda max_memory_allocated')
    if compiled:
        # The compiler's heap stays in the process and the allocator reuses it, so a peak-RSS
        # rise says nothing about the compiled model; only CUDA's allocator counts it.
        return dict(peak_mem_mb=None, mem_method='not measured (compiled, CPU)')
    method = _reset_peak_rss()
    base = _rss_kb(method)
    step()
    peak_mb = (_peak_kb(method) - base) / 1024
    return dict(peak_mem_mb=peak_mb,
                mem_method=method + (', blocks >= 128 KiB mmapped' if exact else ''))


def add_rate(result: Result, matmul_gflops_per_s: float) -> None:
    """Achieved FLOP/s of an inference row and its share of the matmul ceiling."""
    if result.mode == 'infer' and result.gflops is not None and result.latency_s:
        result.achieved_gflops_per_s = result.gflops / result.latency_s
        result.matmul_fraction = result.achieved_gflops_per_s / matmul_gflops_per_s


def matmul_rate(n: int, runs: int, device: str, threads: int,
                precision: str = 'fp32') -> Dict[str, Any]:
    """Median time of an ``n x n @ n x n`` matmul (float32, TF32 or bf16/fp16 operands) and
    its rate in FLOP/s (FMA = 1 FLOP): the device's own ceiling."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    dtype = AUTOCAST.get(precision, torch.float32)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dev, dtype) for _ in range(2))

    def fn():
        with precision_context('tf32' if precision == 'tf32' else 'fp32', dev):
            return a @ b

    time_once(fn, dev)  # warm-up: library initialisation, GPU clocks
    timing = timed_runs(fn, dev, runs, max_seconds=30.0)
    timing.update(n=n, precision=precision, gflops_per_s=n**3 / timing['latency_s'] / 1e9)
    return timing


def train_steps_finite(row: Row, steps: int, lr: float = 1e-4) -> Dict[str, Any]:
    """``steps`` real training steps (AdamW; ``GradScaler`` in fp16): whether every loss
    and every applied update stayed finite. A scaler that skips a step on an overflow is
    doing its job and is counted, not failed."""
    device = torch.device(row.device)
    with row_paths(row):
        model, x = prepare(dataclasses.replace(row, mode='train'))
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        scaler = compat.grad_scaler(device.type) if row.precision == 'fp16' else None
        losses, skipped = [], 0
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with precision_context(row.precision, device):
                loss = output_loss(model(x))
            losses.append(loss.item())
            if scaler is not None:
                scale = scaler.get_scale()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                skipped += scaler.get_scale() < scale
            else:
                loss.backward()
                optimizer.step()
        params_finite = all(torch.isfinite(p).all() for p in model.parameters())
    return dict(finite=all(math.isfinite(v) for v in losses) and bool(params_finite),
                losses=losses, skipped_steps=int(skipped))


# ---------------------------------------------------------------------------------------
# Fresh processes per row (CPU memory is only comparable that way)
# ---------------------------------------------------------------------------------------
def _row_to_json(row: Row) -> str:
    return json.dumps(dataclasses.asdict(row))


def _row_from_json(text: str) -> Row:
    data = json.loads(text)
    data['model'] = ModelSpec(**data['model'])
    data['size'] = tuple(data['size'])
    return Row(**data)


def spawn(row: Row, timeout: float) -> Result:
    """Measure ``row`` in a fresh interpreter; its threads follow ``row.threads``."""
    return _spawn([row], timeout)[0]


def spawn_interleaved(rows: Sequence[Row], timeout: float) -> List[Result]:
    """:func:`measure_interleaved` of ``rows`` in a fresh interpreter."""
    return _spawn(rows, timeout, interleaved=True)


def _spawn(rows: Sequence[Row], timeout: float, interleaved: bool = False) -> List[Result]:
    row = rows[0]
    env = dict(os.environ)
    n = str(row.threads)
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n,
               OMP_WAIT_POLICY=env.get('OMP_WAIT_POLICY', 'PASSIVE'), PYTHONWARNINGS='ignore')
    # The worker imports mmhat the way the caller does (a checkout need not be installed).
    import mmhat
    root = str(Path(mmhat.__file__).resolve().parents[1])
    env['PYTHONPATH'] = os.pathsep.join(
        [root] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    arg = (json.dumps([json.loads(_row_to_json(r)) for r in rows]) if interleaved
           else _row_to_json(row))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'result.json'
        try:
            proc = subprocess.run(
                [sys.executable, '-m', 'mmhat.utils.benchmark', arg, str(out)],
                env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [Result.of(r, error=f'worker exceeded {timeout:.0f} s') for r in rows]
        if out.exists():
            data = json.loads(out.read_text())
            return [Result(**d) for d in (data if isinstance(data, list) else [data])]
        # No result file: killed (e.g. by the OOM killer) or crashed before writing it.
        tail = (proc.stderr or '').strip().splitlines()[-3:]
        return [Result.of(r, error=f'worker exited with {proc.returncode}: {" | ".join(tail)}'
                          [:500]) for r in rows]


def _worker(row_json: str, result_path: str) -> int:
    """One row (a JSON object) -> one result; a list of rows -> their interleaved results."""
    if row_json.lstrip().startswith('['):
        rows = [_row_from_json(json.dumps(r)) for r in json.loads(row_json)]
        try:
            # the caller grouped them; any rows equal but for model and kernels are fine here
            results = measure_interleaved(rows, across='models')
        except Exception as e:
            results = [Result.of(r, error=f'{type(e).__name__}: {e}'[:500]) for r in rows]
        Path(result_path).write_text(json.dumps([dataclasses.asdict(r) for r in results]))
        return 0
    row = _row_from_json(row_json)
    try:
        result = measure(row)
    except Exception as e:  # reported as a row (e.g. out of memory), the run goes on
        result = Result.of(row, error=f'{type(e).__name__}: {e}'[:500])
    Path(result_path).write_text(json.dumps(dataclasses.asdict(result)))
    return 0


def measure_rows(rows: Sequence[Row], isolate: bool = True, retries: int = 0,
                 busy_cores: Optional[float] = None, retry_wait: float = 30.0,
                 timeout: float = 1800.0, matmul_gflops_per_s: Optional[float] = None,
                 on_row: Optional[Callable[[List[Result]], None]] = None,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
                 interleave: Optional[str] = None, processes: int = 1) -> List[Result]:
    """Measure every row: in fresh processes (``isolate``: timing and, on the CPU, memory
    each in its own; rows measured on an oversubscribed CPU are retried ``retries`` times)
    or in this process. With ``interleave`` (and ``isolate``), rows that differ only in
    the fields of :data:`INTERLEAVE_ACROSS` ``[interleave]`` (``'kernels'``, or ``'models'``)
    are timed together in one process (:func:`measure_interleaved`), each row's memory
    still in its own; with ``processes`` > 1, each such group in that many fresh processes
    one after the other (:func:`merge_processes`). ``interleave='alone'`` groups the rows
    as ``'models'`` does but times each row alone in a fresh process, the rows taking turns
    (one turn per ``processes``; ratios: the median of the per-turn ratios): models that
    share a process share its heap, and read up to 30% apart from alone (docs/benchmarks.md).
    ``on_row`` gets the results so far after each row."""
    if processes < 1:
        raise ValueError(f'processes must be at least 1, got {processes}')
    if interleave not in (None, False, True, 'alone') and interleave not in INTERLEAVE_ACROSS:
        raise ValueError(f'unknown interleave mode {interleave!r}: one of '
                         f'{", ".join(list(INTERLEAVE_ACROSS) + ["alone"])}')
    across = 'kernels' if interleave is True else interleave or None
    alone = across == 'alone'
    if alone:  # the groups of 'models', each row timed in a fresh process of its own
        across = 'models'
    groups: Dict[str, List[Row]] = {}
    if across and isolate:
        for row in rows:
            if not row.compile:
                groups.setdefault(interleave_key(row, across), []).append(row)
    timed: Dict[int, Result] = {}
    results: List[Result] = []
    for i, row in enumerate(rows, 1):
        group = (groups.get(interleave_key(row, across), []) if groups and not row.compile
                 else [])
        if len(group) > 1:
            if id(row) not in timed:
                what = ', '.join(dict.fromkeys(r.model.label for r in group))
                runs = []
                for p in range(processes):
                    turn = f' ({p + 1} of {processes})' if processes > 1 else ''
                    if alone:
                        log(f'    timing {len(group)} rows ({what}) in turn, each alone in a '
                            f'fresh process{turn}')
                        runs.append([_measure_isolated(r, retries, busy_cores, retry_wait,
                                                       timeout, log, memory=False)
                                     for r in group])
                        continue
                    log(f'    timing {len(group)} rows ({what}) interleaved in one process'
                        + turn)
                    runs.append(_time_interleaved(group, retries, busy_cores, retry_wait,
                                                  timeout, log))
                timed.update(zip(map(id, group), merge_processes(runs)))
            res = _with_memory(timed[id(row)], row, timeout)
            if matmul_gflops_per_s and res.ok:
                add_rate(res, matmul_gflops_per_s)
        elif not isolate:
            try:
                res = measure(row, matmul_gflops_per_s)
            except Exception as e:
                res = Result.of(row, error=f'{type(e).__name__}: {e}'[:500])
                if row.device.startswith('cuda'):
                    torch.cuda.empty_cache()
        else:
            res = _measure_isolated(row, retries, busy_cores, retry_wait, timeout, log)
            if matmul_gflops_per_s and res.ok:
                add_rate(res, matmul_gflops_per_s)
        results.append(res)
        what = (f'{res.latency_s * 1e3:9.1f} ms  {fmt(res.peak_mem_mb, "8.1f")} MB'
                + (f'  foreign {res.foreign_cores or 0:.2f} cores, own '
                   f'{res.own_cpu_share or 0:.2f}' if row.device == 'cpu' else '')
                if res.ok else res.error or '?')
        log(f'[{i}/{len(rows)}] {row.describe()}: {what}')
        if on_row is not None:
            on_row(results)
    return results


def merge_processes(runs: Sequence[Sequence[Result]]) -> List[Result]:
    """The results of one interleaved group timed in several processes (``runs[p][i]``: row
    ``i`` in process ``p``) as one result per row: ``latency_s`` the median of the
    per-process medians (``latency_by_process_s``), every step in ``latency_all_s``, the
    busiest process's foreign CPU. A row that failed in any process is that failure.
    Between processes the same code differs by up to ~8% (heap state, page placement);
    within one the rows share them, so :attr:`Pair.speedup` takes the median of the
    per-process ratios."""
    if len(runs) == 1:
        return list(runs[0])
    merged = []
    for got in zip(*runs):
        failed = next((r for r in got if not r.ok), None)
        if failed is not None:
            merged.append(failed)
            continue
        res = dataclasses.replace(got[0])
        res.latency_by_process_s = [r.latency_s for r in got]
        res.latency_s = statistics.median(res.latency_by_process_s)
        res.throughput = res.batch / res.latency_s
        res.latency_all_s = [t for r in got for t in r.latency_all_s]
        res.foreign_cores_all = [f for r in got for f in r.foreign_cores_all]
        known = [r.foreign_cores for r in got if r.foreign_cores is not None]
        res.foreign_cores = max(known) if known else None
        shares = [r.own_cpu_share for r in got if r.own_cpu_share is not None]
        res.own_cpu_share = statistics.median(shares) if shares else None
        res.attempts = sum(r.attempts for r in got)
        merged.append(res)
    return merged


def _measure_isolated(row: Row, retries: int, busy_cores: Optional[float], retry_wait: float,
                      timeout: float, log: Callable[[str], None], memory: bool = True) -> Result:
    """``row`` timed in a fresh process (retried while the CPU is busy), then on the CPU its
    memory in another (unless not ``memory``: the caller measures it once for several
    timings)."""
    cpu = row.device == 'cpu'
    phase = 'time' if cpu and not row.compile else 'all'
    limit = _busy_limit(busy_cores, row.threads)
    attempts: List[Result] = []
    for attempt in range(retries + 1):
        res = spawn(dataclasses.replace(row, phase=phase), timeout)
        attempts.append(res)
        busy = res.foreign_cores
        if not res.ok or busy is None or busy <= limit or not cpu:
            break
        if attempt < retries:
            log(f'    busy machine ({busy:.2f} foreign cores), retrying in {retry_wait:.0f} s')
            time.sleep(retry_wait)
    ok = [a for a in attempts if a.ok]
    # Keep the least contended attempt; say how many there were.
    res = min(ok, key=lambda a: a.foreign_cores or 0.0) if ok else attempts[-1]
    res.attempts = len(attempts)
    if ok and phase == 'time' and memory:
        res = _with_memory(res, row, timeout)
    return res


def _busy_limit(busy_cores: Optional[float], threads: int) -> float:
    """Foreign cores above which a CPU row counts as measured on a busy machine (default:
    the cores the row does not use, at least half a core)."""
    return busy_cores if busy_cores is not None else max(0.5, (os.cpu_count() or 1) - threads)


def _with_memory(res: Result, row: Row, timeout: float) -> Result:
    """``res`` with the peak memory of ``row``, measured in a fresh process (contention does
    not change it: no retries)."""
    if not res.ok:
        return res
    mem = spawn(dataclasses.replace(row, phase='memory', flops=False), timeout)
    res.peak_mem_mb, res.mem_method = mem.peak_mem_mb, mem.mem_method
    if mem.error:
        res.mem_method = f'memory pass failed: {mem.error}'
    return res


def _time_interleaved(rows: Sequence[Row], retries: int, busy_cores: Optional[float],
                      retry_wait: float, timeout: float,
                      log: Callable[[str], None]) -> List[Result]:
    """:func:`spawn_interleaved` with the retries of :func:`_measure_isolated` (the whole
    group again when any of its rows saw a busy CPU)."""
    limit = _busy_limit(busy_cores, rows[0].threads)
    attempts: List[List[Result]] = []
    for attempt in range(retries + 1):
        got = spawn_interleaved([dataclasses.replace(r, phase='time') for r in rows],
                                timeout * len(rows))
        attempts.append(got)
        busy = max((r.foreign_cores or 0.0) for r in got)
        if not all(r.ok for r in got) or busy <= limit or rows[0].device != 'cpu':
            break
        if attempt < retries:
            log(f'    busy machine ({busy:.2f} foreign cores), retrying in {retry_wait:.0f} s')
            time.sleep(retry_wait)
    best = min(attempts, key=lambda g: (not all(r.ok for r in g),
                                        max((r.foreign_cores or 0.0) for r in g)))
    for res in best:
        res.attempts = len(attempts)
    return best


# ---------------------------------------------------------------------------------------
# Pairing and rendering
# ---------------------------------------------------------------------------------------
#: the axes that define a measurement, besides the model
AXES = ('size', 'mode', 'attn', 'layout', 'kernels', 'with_cp', 'compile', 'precision',
        'batch')


@dataclass
class Pair:
    """A result and its reference (equal on every axis but the varied ones), with ratios:
    ``speedup`` = reference latency / latency, ``mem_ratio`` = memory / reference memory."""
    result: Result
    reference: Result

    @property
    def speedup(self) -> float:
        """``reference / result`` latency; rows timed together in several processes: the
        median of the per-process ratios (each from one process's alternating steps)."""
        per_process = self.per_process_speedups()
        if per_process:
            return statistics.median(per_process)
        return self.reference.latency_s / self.result.latency_s

    @property
    def time_ratio(self) -> float:
        return 1.0 / self.speedup

    def per_process_speedups(self) -> List[float]:
        """``reference / result`` in each process that timed both (none unless both were
        timed in the same several processes)."""
        a, b = self.result.latency_by_process_s, self.reference.latency_by_process_s
        if len(a) < 2 or len(a) != len(b):
            return []
        return [ref / res for res, ref in zip(a, b)]

    @property
    def mem_ratio(self) -> Optional[float]:
        a, b = self.result.peak_mem_mb, self.reference.peak_mem_mb
        return a / b if a is not None and b else None


def pairs(results: Iterable[Result], vary: Dict[str, Tuple[Any, Any]],
          same_model: bool = True) -> List[Pair]:
    """Every result whose field ``k`` equals ``vary[k][0]`` for every varied ``k``, paired
    with the result that has ``vary[k][1]`` there and equals it on every other axis (and
    model, with ``same_model``). ``vary`` values ``ANY`` match anything (a result may then be
    its own reference: a peer against itself reads 1.00)."""
    ok = [r for r in results if r.ok]
    fixed = [a for a in AXES if a not in vary] + (['model_key'] if same_model else [])
    out = []
    for r in ok:
        if not all(_matches(getattr(r, k), want) for k, (want, _) in vary.items()):
            continue
        for ref in ok:
            if all(_matches(getattr(ref, k), ref_want) for k, (_, ref_want) in vary.items()) \
                    and all(getattr(ref, k) == getattr(r, k) for k in fixed):
                out.append(Pair(r, ref))
                break
    return out


class _Any:
    def __repr__(self) -> str:
        return 'ANY'


ANY = _Any()


def _matches(value: Any, want: Any) -> bool:
    return want is ANY or value == want


def fmt(v: Optional[float], spec: str = '.2f') -> str:
    """A number for a table; ``—`` for none."""
    return '—' if v is None or (isinstance(v, float) and not math.isfinite(v)) else f'{v:{spec}}'


Column = Tuple[str, Callable[[Any], Any]]


def markdown_table(records: Sequence[Any], columns: Sequence[Column]) -> List[str]:
    """A markdown table, one line per record: ``columns`` are (header, record -> cell)."""
    lines = ['| ' + ' | '.join(h for h, _ in columns) + ' |', '|' + '---|' * len(columns)]
    for rec in records:
        lines.append('| ' + ' | '.join(str(get(rec)) for _, get in columns) + ' |')
    return lines


def result_to_dict(result: Result) -> Dict[str, Any]:
    return dataclasses.asdict(result)


def plot_results(results: Sequence[Result], title: str, path: Path, all_paths: bool = False,
                 value: str = 'throughput') -> None:
    """Inference throughput and peak memory against input pixels, one line per model (and
    precision, where several were measured): mmhat backbones solid, peers dashed; other paths
    (explicit, NCHW, compiled) only with ``all_paths``, dotted."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.6))
    series: Dict[Tuple[str, bool, bool], List[Tuple[float, float, float]]] = {}
    ticks: Dict[float, str] = {}
    precisions = {r.precision for r in results if r.mode == 'infer' and r.ok}
    batches = {r.batch for r in results if r.mode == 'infer' and r.ok}
    for r in results:
        if r.mode != 'infer' or not r.ok:
            continue
        default = r.is_default_path()
        if not (default or all_paths):
            continue
        name = r.model + ('' if default else f' ({r.path()})') + (
            f' {r.precision}' if len(precisions) > 1 else '') + (
            f' batch {r.batch}' if len(batches) > 1 else '')
        mpix = r.size[0] * r.size[1] / 1e6
        ticks[mpix] = fmt_size(r.size)
        ours = r.model_type.startswith('mmhat.')
        series.setdefault((name, ours, default), []).append(
            (mpix, getattr(r, value), r.peak_mem_mb if r.peak_mem_mb is not None else
             float('nan')))
    colours = plt.get_cmap('tab20').colors
    for i, ((name, ours, default), pts) in enumerate(series.items()):
        pts.sort()
        xs = [p[0] for p in pts]
        style = dict(marker='o' if ours else 's', color=colours[i % len(colours)],
                     linestyle='-' if ours and default else '--' if default else ':',
                     label=name)
        ax_t.plot(xs, [p[1] for p in pts], **style)
        ax_m.plot(xs, [p[2] for p in pts], **style)
    measured = any(math.isfinite(p[2]) for pts in series.values() for p in pts)
    if not measured:  # e.g. CPU rows timed in-process: no peak memory to show
        ax_m.text(0.5, 0.5, 'peak memory not measured in this run', ha='center',
                  transform=ax_m.transAxes)
    for ax, ylabel in ((ax_t, 'throughput (images/s)'), (ax_m, 'inference peak memory (MB)')):
        ax.set_xlabel('input size H x W (log pixels)')
        ax.set_ylabel(ylabel)
        ax.set_xscale('log')
        if ax is ax_t or measured:
            ax.set_yscale('log')
        # Tick the measured sizes themselves; plain numbers read better than 10^x here.
        ax.set_xticks(sorted(ticks), [ticks[k] for k in sorted(ticks)], rotation=30,
                      fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which='both', alpha=0.3)
    fig.suptitle(title + ' (mmhat solid, peers dashed)', fontsize=9)
    handles, labels = ax_t.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc='lower center', ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * ((len(labels) + 3) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == '__main__':  # a worker of spawn(): one row in (JSON), one result out (file)
    sys.exit(_worker(sys.argv[1], sys.argv[2]))
