"""Speed, memory and FLOP efficiency of mmhat backbones, measured against peers in one run.

    python tools/benchmark.py mmhat.HATNet --arch tiny            # + Swin-T, PVTv2-B1/B2, R50
    python tools/benchmark.py mmhat.ShuntedTransformer:tiny mmhat.ShuntedTransformer:small \\
        --peers none --modes train --infer-sizes 800x1216 --sizes 800x1333 --out shunted.md
    python tools/benchmark.py mmhat.HATNet:tiny --attn both --device cuda --plot
    python tools/benchmark.py mmhat.GroupMixFormer:tiny --peers none --modes infer --compile both
    python tools/benchmark.py mmhat.HATNet:tiny --peers none --attn both --layout both \
        --modes infer --infer-sizes 800x1216          # + ours vs the unfused NCHW reference
    python tools/benchmark.py --quick                            # CI smoke run (~20 s)

What is measured, per (model, input size, mode, attention path, conv weight layout, with_cp,
torch.compile):
  * latency: median over ``--runs`` timed passes after ``--warmup`` passes (batch
    ``--batch-size``); throughput = images / median latency;
  * peak memory: on CUDA ``max_memory_allocated`` above what was allocated before the pass;
    on CPU the rise of the process's peak resident set (VmHWM, reset through
    ``/proc/self/clear_refs``) during the first pass of a second fresh process, in which
    glibc was told from start-up to ``mmap`` every block of 128 KiB or more, so that freed
    tensors leave RSS at once and the figure follows the live tensors (reproducible to ~1%,
    against +-15% with the heap's reuse). The timed passes run in a process of their own
    with the allocator as users have it: after such an allocator change they ran up to 1.6x
    slower, and measured after timed passes the peak counted the heap's reused blocks again.
    Every row runs in a fresh subprocess so one row's peak can never hide another's;
  * mode ``infer``: a forward under ``torch.inference_mode``; mode ``train``: forward, then
    backward of the sum of every output (the backbone's share of a detector's step);
  * FLOPs as tools/get_flops.py counts them (one fused multiply-add = one FLOP), divided by the
    latency, as a fraction of what a plain float32 ``n x n @ n x n`` matmul reaches on the
    same device, with the same threads, in the same run.

Peers are built from mmdet's registry with the settings of mmdet's own detection configs
(Swin-T ``mask-rcnn_swin-t-p4-w7``, PVTv2 ``retinanet_pvtv2-b1/b2``, ResNet-50), except that
every backbone trains all of its stages (no ``frozen_stages``, no ``norm_eval``), so
training-step figures compare architectures, not freezing recipes. Compare models by the
ratio columns (same run, same machine state), never by absolute times from other runs.

CPU timings on a shared machine: one torch thread by default, ``OMP_WAIT_POLICY=PASSIVE``
(spin-waiting OpenMP threads make a contended 2-thread job ~100x slower), and every row
records how much CPU other processes took while it ran ("foreign cores", from /proc/stat).
``--retries`` re-measures rows that ran on an oversubscribed machine.
"""
import argparse
import ctypes
import gc
import inspect
import itertools
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
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

# Before torch is imported (its OpenMP runtime reads this once): passive waiting keeps a
# contended run from spinning (see ARCHITECTURES.md 8.4).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

import torch  # noqa: E402

TOOLS_DIR = Path(__file__).resolve().parent
DEFAULT_INFER_SIZES = ('224', '512', '800x1216')
DEFAULT_TRAIN_SIZES = ('800x1216', )
QUICK_MODEL = 'mmhat.ShuntedTransformer:tiny'
QUICK_SIZE = '128'
#: fewest timed passes a row keeps even when it exceeds ``--max-seconds``
MIN_RUNS = 3

#: peers: key -> (label, mmdet config). Settings of mmdet's detection configs; see the module
#: docstring for why nothing is frozen.
PEERS: Dict[str, Tuple[str, dict]] = {
    'swin-t': ('Swin-T', dict(type='mmdet.SwinTransformer', embed_dims=96, depths=[2, 2, 6, 2],
                              num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4,
                              qkv_bias=True, drop_path_rate=0.2, patch_norm=True,
                              out_indices=(0, 1, 2, 3))),
    'pvtv2-b1': ('PVTv2-B1', dict(type='mmdet.PyramidVisionTransformerV2', embed_dims=64,
                                  num_layers=[2, 2, 2, 2])),
    'pvtv2-b2': ('PVTv2-B2', dict(type='mmdet.PyramidVisionTransformerV2', embed_dims=64,
                                  num_layers=[3, 4, 6, 3])),
    'r50': ('ResNet-50', dict(type='mmdet.ResNet', depth=50, frozen_stages=-1,
                              norm_eval=False)),
}
DEFAULT_PEERS = ('swin-t', 'pvtv2-b1', 'pvtv2-b2', 'r50')
#: the peer the ratio columns refer to when ``--ref`` is not given, in order of preference
REF_PREFERENCE = ('pvtv2-b2', 'r50', 'swin-t', 'pvtv2-b1')


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
        info['device_name'] = torch.cuda.get_device_name(torch.device(device))
        info['cuda'] = torch.version.cuda
    else:
        info['device_name'] = platform.processor() or platform.machine()
        try:
            with open('/proc/cpuinfo') as f:
                names = [ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')]
            info['device_name'] = names[0] if names else info['device_name']
        except OSError:
            pass
    for pkg in ('mmdet', 'mmseg', 'mmengine', 'mmcv'):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # a missing optional package only blanks its version
            info[pkg] = None
    return info


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------
def parse_size(text: str) -> Tuple[int, int]:
    """``'224'`` -> (224, 224); ``'800x1333'`` -> (H=800, W=1333)."""
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


def _registry():
    import mmdet.models  # noqa: F401  (registers the peers under the mmdet scope)

    import mmhat  # noqa: F401
    from mmhat.registry import MODELS
    return MODELS


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


def resolve_model(token: str, default_arch: Optional[str] = None) -> Dict[str, Any]:
    """A model argument -> its description (label, build config, capabilities).

    ``token`` is a peer key (``swin-t``, ``pvtv2-b2``, ...), a registered type with an
    optional ``:arch`` (``mmhat.HATNet:tiny``; mmhat types without one take ``default_arch``
    or the first, smallest row of their ``arch_zoo``), or a config file (``.py``), whose
    ``model.backbone`` is measured as configured (drop path, with_cp, ...), without its
    pretrained weights and with BN for SyncBN (one process).
    """
    MODELS = _registry()
    if token.endswith('.py'):
        return resolve_config(token)
    if token.lower() in PEERS:
        label, cfg = PEERS[token.lower()]
        type_name, arch = cfg['type'], None
        cfg = dict(cfg)
    else:
        type_name, _, arch = token.partition(':')
        arch = arch or default_arch
        cls = MODELS.get(type_name)
        if cls is None:
            mmhat_types = ', '.join(f'mmhat.{n}' for n in sorted(MODELS.module_dict))
            raise SystemExit(f'unknown backbone {type_name!r}; registered mmhat types: '
                             f'{mmhat_types}; peers: {", ".join(PEERS)}')
        zoo = getattr(cls, 'arch_zoo', None) or {}
        if zoo:
            arch = arch or next(iter(zoo))
            if arch.lower() not in zoo:
                raise SystemExit(f'unknown arch {arch!r} for {type_name}; valid: '
                                 f'{", ".join(zoo)}')
            cfg = dict(type=type_name, arch=arch.lower())
            label = f'{cls.__name__}-{arch.lower()}'
        else:
            if arch:
                raise SystemExit(f'{type_name} has no arch_zoo; give its settings another way')
            cfg = dict(type=type_name)
            label = cls.__name__
    cls = MODELS.get(type_name)
    return dict(
        key=token.lower() if token.lower() in PEERS else label, label=label, cfg=cfg,
        type=type_name, arch=cfg.get('arch'), is_mmhat=type_name.startswith('mmhat.'),
        supports_cp=_accepts(cls, 'with_cp'), switchable_attn=uses_attention_switch(cfg))


def resolve_config(path: str) -> Dict[str, Any]:
    """The backbone of an mmdet/mmseg config file, as :func:`resolve_model` describes it."""
    from mmengine.config import Config
    if not Path(path).is_file():
        raise SystemExit(f'config file {path!r} not found')
    backbone = Config.fromfile(path).get('model', {}).get('backbone')
    if not backbone:
        raise SystemExit(f'{path} has no model.backbone to measure')
    cfg = backbone.to_dict()
    for key in ('init_cfg', 'pretrained'):  # measure the architecture, download nothing
        cfg.pop(key, None)
    if (cfg.get('norm_cfg') or {}).get('type') == 'SyncBN':
        cfg['norm_cfg'] = dict(cfg['norm_cfg'], type='BN')
    type_name = cfg['type']
    cls = _registry().get(type_name)
    if cls is None:
        raise SystemExit(f'{path}: backbone type {type_name!r} is not registered')
    arch = cfg.get('arch') if isinstance(cfg.get('arch'), str) else None
    return dict(key=Path(path).stem, label=Path(path).stem, cfg=cfg, type=type_name,
                arch=arch, is_mmhat=type_name.startswith('mmhat.'),
                supports_cp=_accepts(cls, 'with_cp'), switchable_attn=uses_attention_switch(cfg))


def uses_attention_switch(cfg: dict) -> bool:
    """Whether the model has a fused (SDPA) and an explicit attention path to compare.

    True when one of its submodules is defined next to the shared kernel's switch
    (``use_fused_attn``): TransCNN's attention is HAT-Net's ``HMHSA``, so the family file
    alone does not tell. GroupMixFormer's linear attention and the peers have one path.
    Building the model costs well under a second and no input is run.
    """
    model = _registry().build(cfg)
    names = {type(m).__module__ for m in model.modules()}
    return any(hasattr(sys.modules[n], 'use_fused_attn') for n in names if n in sys.modules)


# ---------------------------------------------------------------------------------------
# Measuring (inside a worker subprocess)
# ---------------------------------------------------------------------------------------
def _reset_peak_rss() -> Optional[str]:
    """Reset VmHWM to the current RSS; returns the method that will read the peak."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return 'VmHWM'
    except OSError:
        return 'ru_maxrss'


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


def _status_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_kb(method: str) -> int:
    if method == 'VmHWM':
        return _status_kb('VmRSS')
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def _peak_kb(method: str) -> int:
    if method == 'VmHWM':
        return _status_kb('VmHWM')
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _time_once(fn, device: torch.device) -> float:
    """Seconds for one call; CUDA events around it on a GPU (the launch is asynchronous)."""
    if device.type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _sync(device)
        start.record()
        fn()
        end.record()
        _sync(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed_runs(fn, device: torch.device, runs: int, max_seconds: float) -> Dict[str, Any]:
    """Run ``fn`` up to ``runs`` times (at least ``MIN_RUNS`` when time runs out)."""
    times, foreign, share = [], [], []
    start = time.perf_counter()
    for i in range(runs):
        before = CpuSample()
        times.append(_time_once(fn, device))
        after = CpuSample()
        foreign.append(before.foreign_cores(after))
        share.append(before.own_share(after))
        if i + 1 >= min(runs, MIN_RUNS) and time.perf_counter() - start > max_seconds:
            break
    known = [f for f in foreign if f is not None]
    return dict(latency_s=statistics.median(times), latency_all_s=times,
                foreign_cores=statistics.median(known) if known else None,
                foreign_cores_all=foreign, own_cpu_share=statistics.median(share))


def count_gflops(model_desc: Dict[str, Any], model: torch.nn.Module,
                 hw: Tuple[int, int]) -> float:
    """GFLOPs of one image at ``hw``, counted as tools/get_flops.py counts them."""
    sys.path.insert(0, str(TOOLS_DIR))
    import get_flops
    if model_desc['is_mmhat'] and model_desc['arch']:
        return get_flops.measure(model_desc['type'], model_desc['arch'], hw)['gflops']
    # Peers: the same analyzer and settings as get_flops.measure, on a CPU copy in eval mode.
    from mmengine.analysis import FlopAnalyzer
    model = model.cpu()
    model.eval()  # mmdet's Swin.train() returns None, so no chaining
    with torch.no_grad():
        analyzer = FlopAnalyzer(model, torch.zeros(1, 3, *hw))
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        return analyzer.total() / 1e9


def run_model_task(task: Dict[str, Any]) -> Dict[str, Any]:
    """Build one model and measure one row; runs in a fresh process (see module docstring)."""
    torch.set_num_threads(task['threads'])
    # 'all': time and memory in this process (CUDA, whose allocator counts exactly);
    # 'time' / 'memory': one of them, the parent runs the other in a second fresh process.
    phase = task.get('phase', 'all')
    exact = False
    if phase == 'memory':
        # Before anything is allocated, so that the heap never holds a large freed block.
        exact = _set_mmap_threshold(128 * 1024)
    desc = task['model']
    MODELS = _registry()
    from mmhat.models.layers import set_fused_attn
    if task['attn'] is not None:
        set_fused_attn(task['attn'] == 'fused')
    device = torch.device(task['device'])
    cfg = dict(desc['cfg'])
    if task['with_cp'] or 'with_cp' in cfg:  # a config's own with_cp follows the row too
        cfg['with_cp'] = task['with_cp']
    model = MODELS.build(cfg).to(device)
    if task.get('layout') == 'nchw':
        # The reference layout: NCHW conv weights, as the official models store them (mmhat
        # backbones store them channels-last, see PyramidBackbone.use_channels_last).
        model.to(memory_format=torch.contiguous_format)
    train = task['mode'] == 'train'
    model.train(train)
    H, W = task['size']
    x = torch.randn(task['batch'], 3, H, W, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    # torch.compile (inductor) wraps the module; parameters, and so the backward, are shared.
    net = torch.compile(model) if task.get('compile') else model

    if train:
        def step():
            outs = net(x)
            # One scalar that depends on every output, so backward reaches every stage.
            loss = sum(o.float().sum() for o in outs)
            loss.backward()
            model.zero_grad(set_to_none=True)
    else:
        def step():
            with torch.inference_mode():
                net(x)

    compile_s = None
    if task.get('compile'):
        # Compilation is a one-time cost (and its compiler's memory is not the model's):
        # pay it before the measured first pass, and report it.
        t0 = time.perf_counter()
        step()
        _sync(device)
        compile_s = time.perf_counter() - t0

    result = dict(compile_s=compile_s, params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    if phase in ('all', 'time'):
        for _ in range(task['warmup']):
            step()
        result.update(_timed_runs(step, device, task['runs'], task['max_seconds']))
    if phase == 'time':
        return _with_flops(result, task, model)

    # Memory: the peak above what was allocated before the pass.
    gc.collect()
    if device.type == 'cuda':
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        mem_method = 'cuda max_memory_allocated'
    elif compile_s is not None:
        # The compiler's heap stays in the process and the allocator reuses it, so a peak-RSS
        # rise says nothing about the compiled model; only CUDA's allocator counts it.
        peak_mb, mem_method = None, 'not measured (compiled, CPU)'
    else:
        # The first pass of a fresh process (one-time buffers included: a real first step
        # pays them too), every block >= 128 KiB mmapped since start-up (phase 'memory').
        mem_method = _reset_peak_rss()
        base = _rss_kb(mem_method)
        step()
        peak_mb = (_peak_kb(mem_method) - base) / 1024
        if exact:
            mem_method += ', blocks >= 128 KiB mmapped'
    result.update(peak_mem_mb=peak_mb, mem_method=mem_method)
    return _with_flops(result, task, model)


def _with_flops(result: Dict[str, Any], task: Dict[str, Any], model) -> Dict[str, Any]:
    """``result`` with the row's GFLOPs where the task asks for them (once per model/size)."""
    if task['flops']:
        H, W = task['size']
        result['gflops'] = count_gflops(task['model'], model, (H, W)) * task['batch']
    return result


def run_matmul_task(n: int, runs: int, device: str, threads: int) -> Dict[str, Any]:
    """Median time of a float32 ``n x n @ n x n`` and the rate in FLOP/s (FMA = 1 FLOP)."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dev) for _ in range(2))
    fn = lambda: a @ b  # noqa: E731
    _time_once(fn, dev)  # warm-up: library initialisation, GPU clocks
    timing = _timed_runs(fn, dev, runs, max_seconds=30.0)
    timing.update(n=n, gflops_per_s=n**3 / timing['latency_s'] / 1e9)
    return timing


def worker_main(task_json: str, result_path: str) -> int:
    """Entry point of a measuring subprocess: one task in (JSON), one result out (file)."""
    task = json.loads(task_json)
    try:
        result = run_model_task(task)
    except Exception as e:  # reported as a row (e.g. out of memory), the run goes on
        result = dict(error=f'{type(e).__name__}: {e}'[:500])
    Path(result_path).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------
# Orchestration (parent process)
# ---------------------------------------------------------------------------------------
def spawn(task: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """Measure ``task`` in a fresh interpreter; its threads follow ``task['threads']``."""
    env = dict(os.environ)
    n = str(task['threads'])
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OMP_WAIT_POLICY=env.get(
        'OMP_WAIT_POLICY', 'PASSIVE'), PYTHONWARNINGS='ignore')
    # The worker imports mmhat the way the caller does (a checkout need not be installed).
    env['PYTHONPATH'] = os.pathsep.join(
        [str(TOOLS_DIR.parent)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'result.json'
        try:
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), '--worker', json.dumps(task),
                 '--worker-result', str(out)], env=env, capture_output=True, text=True,
                timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(error=f'worker exceeded {timeout:.0f} s')
        if out.exists():
            return json.loads(out.read_text())
        # No result file: killed (e.g. by the OOM killer) or crashed before writing it.
        tail = (proc.stderr or '').strip().splitlines()[-3:]
        return dict(error=f'worker exited with {proc.returncode}: {" | ".join(tail)}'[:500])


def plan_rows(models: Sequence[Dict[str, Any]], args) -> List[Dict[str, Any]]:
    """Every (size, model, mode, attention, layout, with_cp, compile) to measure; sizes outermost so the
    rows compared with each other run close together in time."""
    infer = [parse_size(s) for s in args.infer_sizes] + [parse_size(s) for s in args.sizes]
    train = [parse_size(s) for s in args.train_sizes] + [parse_size(s) for s in args.sizes]
    sizes = list(dict.fromkeys(infer + train))
    attn_paths = ['fused', 'explicit'] if args.attn == 'both' else [args.attn]
    cp_flags = {'off': [False], 'on': [True], 'both': [False, True]}[args.cp]
    compile_flags = {'off': [False], 'on': [True], 'both': [False, True]}[args.compile]
    layouts = {'channels_last': ['channels_last'], 'nchw': ['nchw'],
               'both': ['channels_last', 'nchw']}[args.layout]
    rows, counted = [], set()
    for hw in sizes:
        for m in models:
            for mode in args.modes:
                if hw not in (infer if mode == 'infer' else train):
                    continue
                for attn, layout in itertools.product(
                        attn_paths if m['switchable_attn'] else [None],
                        layouts if m['is_mmhat'] else [None]):
                    for cp, comp in itertools.product(
                            cp_flags if mode == 'train' else [False], compile_flags):
                        if cp and not m['supports_cp']:
                            continue
                        flops = mode == 'infer' and (m['key'], hw) not in counted
                        if flops:
                            counted.add((m['key'], hw))
                        rows.append(dict(model=m, size=list(hw), mode=mode, attn=attn,
                                         layout=layout, with_cp=cp, compile=comp,
                                         batch=args.batch_size,
                                         threads=args.threads, device=args.device,
                                         runs=args.runs, warmup=args.warmup,
                                         max_seconds=args.max_seconds, flops=flops,
                                         # CPU peak RSS needs a process of its own (see
                                         # run_model_task); compiled rows report none.
                                         phase='time' if str(args.device).startswith('cpu')
                                         and not comp else 'all'))
    return rows


def _fmt_size(hw: Sequence[int]) -> str:
    return f'{hw[0]}x{hw[1]}'


def measure_rows(rows: List[Dict[str, Any]], args,
                 on_row=None) -> List[Dict[str, Any]]:
    """Run every row (retrying ones measured on an oversubscribed machine); ``on_row``
    gets the results so far after each row."""
    busy_limit = (args.busy_cores if args.busy_cores is not None else
                  max(0.5, (os.cpu_count() or 1) - args.threads))
    results = []
    for i, task in enumerate(rows, 1):
        attempts = []
        for attempt in range(args.retries + 1):
            res = spawn(task, args.worker_timeout)
            attempts.append(res)
            busy = res.get('foreign_cores')
            if 'error' in res or busy is None or busy <= busy_limit or args.device != 'cpu':
                break
            if attempt < args.retries:
                print(f'    busy machine ({busy:.2f} foreign cores), retrying in '
                      f'{args.retry_wait:.0f} s', file=sys.stderr, flush=True)
                time.sleep(args.retry_wait)
        ok = [a for a in attempts if 'error' not in a]
        # Keep the least contended attempt; say how many there were.
        res = min(ok, key=lambda a: a.get('foreign_cores') or 0.0) if ok else attempts[-1]
        if ok and task['phase'] == 'time':  # CPU, eager (plan_rows)
            # Memory in a second fresh process (contention does not change it: no retries).
            mem = spawn(dict(task, phase='memory', flops=False), args.worker_timeout)
            res = dict(res, **{k: mem.get(k) for k in ('peak_mem_mb', 'mem_method')})
            if 'error' in mem:
                res['mem_method'] = f'memory pass failed: {mem["error"]}'
        row = {k: v for k, v in task.items() if k not in ('model', 'flops')}
        row.update(model=task['model']['label'], model_key=task['model']['key'],
                   model_type=task['model']['type'], arch=task['model']['arch'],
                   attempts=len(attempts), **res)
        if 'latency_s' in row:
            row['throughput'] = row['batch'] / row['latency_s']
        results.append(row)
        attn = (f' {task["attn"]}' if task['attn'] else '') + (
            ' NCHW' if task.get('layout') == 'nchw' else '')
        cp = (' with_cp' if task['with_cp'] else '') + (' compiled' if task['compile'] else '')
        mem = _f(row.get('peak_mem_mb'), '8.1f')
        what = (f'{row["latency_s"] * 1e3:9.1f} ms  {mem} MB  foreign '
                f'{row["foreign_cores"] or 0:.2f} cores, own {row["own_cpu_share"]:.2f}'
                if 'latency_s' in row else
                row.get('error', '?'))
        print(f'[{i}/{len(rows)}] {row["model"]} {_fmt_size(row["size"])} {row["mode"]}{attn}'
              f'{cp}: {what}', file=sys.stderr, flush=True)
        if on_row is not None:
            on_row(results)
    return results


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def add_ratios(results: List[Dict[str, Any]], matmul: Dict[str, Any],
               ref: Optional[str]) -> None:
    """Achieved FLOP/s, its fraction of the matmul rate, and ratios against the reference
    peer's row with the same size and mode (and with_cp where the peer has it)."""
    flops = {(r['model_key'], tuple(r['size'])): r['gflops'] for r in results if 'gflops' in r}
    for r in results:
        g = flops.get((r['model_key'], tuple(r['size'])))
        if g is not None and r['mode'] == 'infer' and 'latency_s' in r:
            r['gflops'] = g
            r['achieved_gflops_per_s'] = g / r['latency_s']
            r['matmul_fraction'] = r['achieved_gflops_per_s'] / matmul['gflops_per_s']
        if ref is None or 'latency_s' not in r:
            continue
        peers = [p for p in results if p['model_key'] == ref and p['size'] == r['size']
                 and p['mode'] == r['mode'] and 'latency_s' in p]
        same_cp = [p for p in peers if p['with_cp'] == r['with_cp']
                   and p.get('compile') == r.get('compile')]
        peer = (same_cp or [p for p in peers if not p['with_cp']] or [None])[0]
        if peer is not None:
            r['vs_ref_speed'] = peer['latency_s'] / r['latency_s']
            r['vs_ref_mem'] = _ratio(r['peak_mem_mb'], peer['peak_mem_mb'])


def summaries(results: List[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """Fused/explicit, with_cp/plain, compiled/eager and ours/reference ratios of the same
    model, size and mode."""
    ok = [r for r in results if 'latency_s' in r]

    def find(r, **kw):
        for o in ok:
            if all(o.get(k) == v for k, v in dict(model_key=r['model_key'], size=r['size'],
                                                 mode=r['mode'], **kw).items()):
                return o
        return None

    fused, cp, compiled, reference = [], [], [], []
    for r in ok:
        if r.get('compile'):
            e = find(r, attn=r['attn'], layout=r.get('layout'), with_cp=r['with_cp'],
                     compile=False)
            if e:
                compiled.append(dict(model=r['model'], size=r['size'], mode=r['mode'],
                                     attn=r['attn'], with_cp=r['with_cp'],
                                     speedup=e['latency_s'] / r['latency_s'],
                                     mem_ratio=_ratio(r['peak_mem_mb'], e['peak_mem_mb']),
                                     compile_s=r.get('compile_s')))
        if r['attn'] == 'fused':
            e = find(r, attn='explicit', layout=r.get('layout'), with_cp=r['with_cp'],
                     compile=r.get('compile'))
            if e:
                fused.append(dict(model=r['model'], size=r['size'], mode=r['mode'],
                                  layout=r.get('layout'), with_cp=r['with_cp'],
                                  speedup=e['latency_s'] / r['latency_s'],
                                  mem_ratio=_ratio(r['peak_mem_mb'], e['peak_mem_mb'])))
        if r['mode'] == 'train' and r['with_cp']:
            p = find(r, attn=r['attn'], layout=r.get('layout'), with_cp=False,
                     compile=r.get('compile'))
            if p:
                cp.append(dict(model=r['model'], size=r['size'], attn=_path(r),
                               mem_ratio=_ratio(r['peak_mem_mb'], p['peak_mem_mb']),
                               time_ratio=r['latency_s'] / p['latency_s'],
                               mem_mb=r['peak_mem_mb'], plain_mem_mb=p['peak_mem_mb']))
        # Ours against the faithful unfused reference of the family: the same model with
        # explicit attention (where it has a fused path) and NCHW weights, eager.
        if (r.get('layout') == 'channels_last' and r['attn'] in ('fused', None)
                and not r.get('compile')):
            e = find(r, attn='explicit' if r['attn'] else None, layout='nchw',
                     with_cp=r['with_cp'], compile=False)
            if e:
                reference.append(dict(model=r['model'], size=r['size'], mode=r['mode'],
                                      with_cp=r['with_cp'], path=_path(r), ref_path=_path(e),
                                      speedup=e['latency_s'] / r['latency_s'],
                                      mem_ratio=_ratio(r['peak_mem_mb'], e['peak_mem_mb'])))
    return dict(fused_vs_explicit=fused, with_cp_vs_plain=cp, compiled_vs_eager=compiled,
                vs_reference=reference)


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------
def _f(v: Optional[float], fmt: str = '.2f') -> str:
    return '—' if v is None or (isinstance(v, float) and not math.isfinite(v)) else f'{v:{fmt}}'


def _path(r: Dict[str, Any]) -> str:
    """The attention path of a row, NCHW weights if so, and torch.compile if so."""
    return ((r['attn'] or '—') + (', NCHW' if r.get('layout') == 'nchw' else '') +
            (' + compile' if r.get('compile') else ''))


def to_markdown(report: Dict[str, Any]) -> str:
    m, mm = report['machine'], report['matmul']
    ref = report['settings']['ref_label']
    mem_method = next((r['mem_method'] for r in report['results'] if 'mem_method' in r), '—')
    lines = [
        '# mmhat backbone benchmark', '',
        f'- device: {m["device"]} ({m["device_name"]}), torch {m["torch"]}, mmdet {m["mmdet"]}, '
        f'threads {m["threads"]} of {m["cpu_count"]} cores, OMP_WAIT_POLICY='
        f'{m["omp_wait_policy"]}',
        f'- machine load (1/5/15 min): start {m["load_average_start"]}, end '
        f'{m["load_average_end"]}; foreign CPU during the rows: median '
        f'{_f(m["foreign_cores_median"])} cores, max {_f(m["foreign_cores_max"])}; CPU the '
        f'measured process got: median {_f(m["own_cpu_share_median"])} cores (of '
        f'{m["threads"]} thread(s) asked)',
        f'- float32 matmul {mm["n"]}x{mm["n"]}: {mm["latency_s"] * 1e3:.1f} ms median = '
        f'{mm["gflops_per_s"]:.1f} GFLOP/s (1 FMA = 1 FLOP, as get_flops counts)',
        f'- batch {report["settings"]["batch_size"]}; median of up to '
        f'{report["settings"]["runs"]} runs after {report["settings"]["warmup"]} warm-up; '
        f'peak memory = rise during the first pass of a separate process ({mem_method})',
        '',
    ]
    vs = f' vs {ref}' if ref else ''
    for mode, title, extra in (('infer', 'Inference', ['GFLOPs', 'GFLOP/s', '% of matmul']),
                               ('train', 'Training step (forward + backward)', ['with_cp'])):
        rows = [r for r in report['results'] if r['mode'] == mode]
        if not rows:
            continue
        head = (['model', 'input', 'path'] + (extra if mode == 'train' else []) +
                ['latency (ms)', 'img/s', 'peak mem (MB)'] + (extra if mode == 'infer' else []) +
                ([f'speed{vs}', f'memory{vs}'] if ref else []) +
                ['foreign CPU (cores)', 'own CPU (cores)'])
        lines += [f'## {title}', '', '| ' + ' | '.join(head) + ' |',
                  '|' + '---|' * len(head)]
        for r in rows:
            cells = [r['model'], _fmt_size(r['size']), _path(r)]
            if mode == 'train':
                cells.append('on' if r['with_cp'] else 'off')
            if 'latency_s' not in r:
                cells += [f'error: {r.get("error", "?")}'] + [''] * (len(head) - len(cells) - 1)
                lines.append('| ' + ' | '.join(cells) + ' |')
                continue
            cells += [_f(r['latency_s'] * 1e3, '.1f'), _f(r['throughput'], '.2f'),
                      _f(r['peak_mem_mb'], '.0f')]
            if mode == 'infer':
                cells += [_f(r.get('gflops'), '.1f'), _f(r.get('achieved_gflops_per_s'), '.1f'),
                          _f(100 * r['matmul_fraction'] if 'matmul_fraction' in r else None,
                             '.0f')]
            if ref:
                cells += [_f(r.get('vs_ref_speed')), _f(r.get('vs_ref_mem'))]
            cells += [_f(r.get('foreign_cores')), _f(r.get('own_cpu_share'))]
            lines.append('| ' + ' | '.join(cells) + ' |')
        lines.append('')
    s = report['summaries']
    if s['fused_vs_explicit']:
        lines += ['## Fused (SDPA) vs explicit attention', '',
                  '| model | input | mode | with_cp | speed-up (fused/explicit) | memory ratio '
                  '(fused/explicit) |', '|---|---|---|---|---|---|']
        for r in s['fused_vs_explicit']:
            lines.append(f'| {r["model"]}{" (NCHW)" if r.get("layout") == "nchw" else ""} | '
                         f'{_fmt_size(r["size"])} | {r["mode"]} | '
                         f'{"on" if r["with_cp"] else "off"} | {r["speedup"]:.2f} | '
                         f'{_f(r["mem_ratio"])} |')
        lines.append('')
    if s.get('vs_reference'):
        lines += ['## Ours vs the faithful unfused reference (explicit attention, NCHW '
                  'weights)', '',
                  '| model | input | mode | with_cp | ours | reference | speed-up | memory ratio |',
                  '|---|---|---|---|---|---|---|---|']
        for r in s['vs_reference']:
            lines.append(f'| {r["model"]} | {_fmt_size(r["size"])} | {r["mode"]} | '
                         f'{"on" if r["with_cp"] else "off"} | {r["path"]} | {r["ref_path"]} | '
                         f'{r["speedup"]:.2f} | {_f(r["mem_ratio"])} |')
        lines.append('')
    if s.get('compiled_vs_eager'):
        lines += ['## torch.compile (inductor) vs eager', '',
                  '| model | input | mode | attention | with_cp | speed-up (compiled/eager) | '
                  'memory ratio | compile time (s) |', '|---|---|---|---|---|---|---|---|']
        for r in s['compiled_vs_eager']:
            lines.append(f'| {r["model"]} | {_fmt_size(r["size"])} | {r["mode"]} | '
                         f'{r["attn"] or "—"} | {"on" if r["with_cp"] else "off"} | '
                         f'{r["speedup"]:.2f} | {_f(r["mem_ratio"])} | '
                         f'{_f(r["compile_s"], ".0f")} |')
        lines.append('')
    if s['with_cp_vs_plain']:
        lines += ['## Activation checkpointing (with_cp) vs plain, training step', '',
                  '| model | input | path | peak mem plain (MB) | with_cp (MB) | memory ratio '
                  '| time ratio |', '|---|---|---|---|---|---|---|']
        for r in s['with_cp_vs_plain']:
            lines.append(f'| {r["model"]} | {_fmt_size(r["size"])} | {r["attn"] or "—"} | '
                         f'{_f(r["plain_mem_mb"], ".0f")} | {_f(r["mem_mb"], ".0f")} | '
                         f'{_f(r["mem_ratio"])} | {r["time_ratio"]:.2f} |')
        lines.append('')
    return '\n'.join(lines)


def _is_default_path(r: Dict[str, Any]) -> bool:
    """The row runs the model as users get it: fused attention (where there is a choice),
    channels-last weights (for mmhat models), eager."""
    return (r['attn'] in ('fused', None) and r.get('layout') in ('channels_last', None)
            and not r.get('compile'))


def plot(report: Dict[str, Any], path: Path, all_paths: bool = False) -> None:
    """Inference throughput and peak memory against input pixels, one line per model: our
    backbones solid, peers dashed; other paths (explicit, NCHW, compiled) only with
    ``all_paths``, dotted."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.6))
    series: Dict[Tuple[str, bool, bool], List[Tuple[float, float, float]]] = {}
    ticks: Dict[float, str] = {}
    for r in report['results']:
        if r['mode'] != 'infer' or 'latency_s' not in r:
            continue
        default = _is_default_path(r)
        if not (default or all_paths):
            continue
        name = r['model'] + ('' if default else f' ({_path(r)})')
        mpix = r['size'][0] * r['size'][1] / 1e6
        ticks[mpix] = _fmt_size(r['size'])
        ours = str(r.get('model_type', '')).startswith('mmhat.')
        series.setdefault((name, ours, default), []).append(
            (mpix, r['throughput'],
             r['peak_mem_mb'] if r['peak_mem_mb'] is not None else float('nan')))
    colours = plt.get_cmap('tab20').colors
    for i, ((name, ours, default), pts) in enumerate(series.items()):
        pts.sort()
        xs = [p[0] for p in pts]
        style = dict(marker='o' if ours else 's', color=colours[i % len(colours)],
                     linestyle='-' if ours and default else '--' if default else ':',
                     label=name)
        ax_t.plot(xs, [p[1] for p in pts], **style)
        ax_m.plot(xs, [p[2] for p in pts], **style)
    for ax, ylabel in ((ax_t, 'throughput (images/s)'), (ax_m, 'inference peak memory (MB)')):
        ax.set_xlabel('input size H x W (log pixels)')
        ax.set_ylabel(ylabel)
        ax.set_xscale('log')
        ax.set_yscale('log')
        # Tick the measured sizes themselves; plain numbers read better than 10^x here.
        ax.set_xticks(sorted(ticks), [ticks[k] for k in sorted(ticks)], rotation=30,
                      fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which='both', alpha=0.3)
    m = report['machine']
    fig.suptitle(f'{m["device_name"]}, {m["threads"]} thread(s), torch {m["torch"]}, batch '
                 f'{report["settings"]["batch_size"]} (mmhat solid, peers dashed)', fontsize=9)
    handles, labels = ax_t.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc='lower center', ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * ((len(labels) + 3) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('models', nargs='*',
                   help='registered backbones, optionally with :arch (mmhat.HATNet:tiny), '
                        'config files (their model.backbone), '
                        f'or peer keys ({", ".join(PEERS)})')
    p.add_argument('--arch', help='arch of mmhat models given without :arch (default: the '
                                  'first, smallest row of their arch_zoo)')
    p.add_argument('--peers', nargs='+', default=list(DEFAULT_PEERS),
                   help=f'peers measured alongside (default: all: {" ".join(DEFAULT_PEERS)}); '
                        '"none" for none')
    p.add_argument('--ref', help='the model the "vs" columns compare with (a peer key or a '
                                 'label; default: PVTv2-B2, else ResNet-50, ... if measured)')
    p.add_argument('--modes', nargs='+', choices=['infer', 'train'], default=['infer', 'train'])
    p.add_argument('--infer-sizes', nargs='+', default=list(DEFAULT_INFER_SIZES),
                   metavar='HxW', help='inference sizes (default: 224 512 800x1216)')
    p.add_argument('--train-sizes', nargs='+', default=list(DEFAULT_TRAIN_SIZES),
                   metavar='HxW', help='training-step sizes (default: 800x1216)')
    p.add_argument('--sizes', nargs='+', default=[], metavar='HxW',
                   help='extra sizes for every mode, height first (800x1333 = H 800, W 1333)')
    p.add_argument('--attn', choices=['fused', 'explicit', 'both'], default='fused',
                   help='attention path of families with the shared softmax kernel')
    p.add_argument('--layout', choices=['channels_last', 'nchw', 'both'],
                   default='channels_last',
                   help='conv weights of mmhat backbones: channels-last as built, NCHW as the '
                        'official models (the reference), or both, which adds a table against '
                        'the reference (explicit attention, NCHW); peers run as mmdet builds them')
    p.add_argument('--cp', choices=['off', 'on', 'both'], default='both',
                   help='with_cp for training rows (models without with_cp: off only)')
    p.add_argument('--compile', choices=['off', 'on', 'both'], default='off',
                   help='run the model under torch.compile (inductor); "both" adds eager rows '
                        'and a compiled/eager table. Compilation happens before the measured '
                        'passes and its time is reported separately')
    p.add_argument('--device', default='cpu', help='cpu or cuda[:i]')
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads (default 1: shared 2-core machines, see docstring)')
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--runs', type=int, default=5, help='timed passes per row (median)')
    p.add_argument('--warmup', type=int, default=1,
                   help='untimed passes before the timed ones (>= 1)')
    p.add_argument('--max-seconds', type=float, default=60.0,
                   help=f'stop a row\'s timed passes after this long (>= {MIN_RUNS} kept)')
    p.add_argument('--matmul-size', type=int, default=2048)
    p.add_argument('--retries', type=int, default=0,
                   help='re-measure a row this often while the machine was oversubscribed')
    p.add_argument('--retry-wait', type=float, default=30.0, help='seconds before a retry')
    p.add_argument('--busy-cores', type=float, default=None,
                   help='foreign cores above which a row counts as contended (default: '
                        'cores - threads, at least 0.5)')
    p.add_argument('--worker-timeout', type=float, default=1800.0)
    p.add_argument('--out', type=Path, help='write the markdown here, and the JSON next to it')
    p.add_argument('--json', type=Path, help='write the JSON here (default: --out as .json)')
    p.add_argument('--plot', type=Path, nargs='?', const=True, default=None,
                   help='write a PNG (default path: --out as .png, else benchmark.png)')
    p.add_argument('--plot-all-paths', action='store_true',
                   help='plot every path (explicit, NCHW, compiled), not only the default one')
    p.add_argument('--replot', type=Path, metavar='JSON',
                   help='draw the plot of a saved report (its JSON) again and exit; with '
                        '--plot PATH (default: the JSON as .png)')
    p.add_argument('--quick', action='store_true',
                   help=f'CI smoke run: {QUICK_MODEL} (or the first model) at {QUICK_SIZE}, no '
                        'peers, 1 warm-up + 2 runs, with_cp off, fused attention')
    p.add_argument('--worker', help=argparse.SUPPRESS)
    p.add_argument('--worker-result', help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.worker_result)
    if args.replot:
        report = json.loads(args.replot.read_text())
        path = args.plot if isinstance(args.plot, Path) else args.replot.with_suffix('.png')
        plot(report, path, args.plot_all_paths)
        print(f'plot: {path}', file=sys.stderr)
        return 0
    if args.quick:
        args.models = args.models[:1] or [QUICK_MODEL]
        args.peers, args.infer_sizes, args.train_sizes, args.sizes = [], [QUICK_SIZE], [
            QUICK_SIZE], []
        args.warmup, args.runs, args.cp, args.matmul_size = 1, 2, 'off', 512
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit('--device cuda given, but this torch sees no CUDA device')
    args.warmup = max(1, args.warmup)
    peers = [] if args.peers in (['none'], []) else args.peers
    unknown = [p for p in peers if p.lower() not in PEERS]
    if unknown:
        raise SystemExit(f'unknown peers {unknown}; known: {", ".join(PEERS)}')
    if not args.models and not peers:
        raise SystemExit('give at least one model (e.g. mmhat.HATNet --arch tiny), a peer, '
                         'or --quick')
    models = []
    for token in list(args.models) + [p for p in peers if p.lower() not in
                                      [m.lower() for m in args.models]]:
        models.append(resolve_model(token, args.arch))
    keys = [m['key'] for m in models]
    ref = args.ref.lower() if args.ref else next((k for k in REF_PREFERENCE if k in keys), None)
    if ref is not None and ref not in keys:
        by_label = {m['label'].lower(): m['key'] for m in models}
        if ref not in by_label:
            raise SystemExit(f'--ref {args.ref!r} is not among the measured models {keys}')
        ref = by_label[ref]
    ref_label = next((m['label'] for m in models if m['key'] == ref), None)

    torch.set_num_threads(args.threads)
    machine = machine_info(args.device, args.threads)
    print(f'device {args.device} ({machine["device_name"]}), torch {torch.__version__}, '
          f'{args.threads} thread(s) of {machine["cpu_count"]}, load average '
          f'{machine["load_average_start"]}', file=sys.stderr, flush=True)
    # The matmul runs here (the parent holds no model; threads are already set), not in a
    # subprocess: one interpreter start less, which matters for --quick.
    matmul = run_matmul_task(args.matmul_size, 5, args.device, args.threads)
    print(f'matmul {args.matmul_size}^3: {matmul["gflops_per_s"]:.1f} GFLOP/s',
          file=sys.stderr, flush=True)
    json_path = args.json or (args.out.with_suffix('.json') if args.out else None)
    for path in (args.out, json_path, args.plot):
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)

    def save_partial(done: List[Dict[str, Any]]) -> None:
        # Long runs on a shared machine get interrupted; keep what was measured.
        if json_path:
            json_path.write_text(json.dumps(dict(partial=True, machine=machine, matmul=matmul,
                                                 results=done), indent=1, default=str))

    results = measure_rows(plan_rows(models, args), args, save_partial)
    add_ratios(results, matmul, ref)
    foreign = [r['foreign_cores'] for r in results if r.get('foreign_cores') is not None]
    share = [r['own_cpu_share'] for r in results if 'own_cpu_share' in r]
    machine.update(load_average_end=load_average(),
                   foreign_cores_median=statistics.median(foreign) if foreign else None,
                   foreign_cores_max=max(foreign) if foreign else None,
                   own_cpu_share_median=statistics.median(share) if share else None)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if not k.startswith('worker')}
    settings.update(ref=ref, ref_label=ref_label, min_runs=MIN_RUNS)
    report = dict(partial=False, machine=machine, settings=settings, matmul=matmul,
                  models=models, results=results, summaries=summaries(results))
    md = to_markdown(report)
    print(md)
    if args.out:
        args.out.write_text(md + '\n')
    if json_path:
        json_path.write_text(json.dumps(report, indent=1, default=str) + '\n')
    if args.plot is not None:
        path = (args.plot if isinstance(args.plot, Path) else
                args.out.with_suffix('.png') if args.out else Path('benchmark.png'))
        plot(report, path, args.plot_all_paths)
        print(f'plot: {path}', file=sys.stderr)
    errors = [r for r in results if 'error' in r]
    return 1 if errors else 0


if __name__ == '__main__':
    sys.exit(main())
