"""One prepared command that checks and benchmarks every family on a CUDA machine.

    python tools/gpu_check.py [--out docs/benchmarks/gpu.md] [--device cuda] [--quick]
        [--budget-s 420]

Run from the repository root. It installs nothing: it uses whatever is importable (torch,
mmengine and mmcv are needed; mmdet for its peers, else timm's). On a bare machine without
network, `bash tools/pack_gpu_deps.sh` (run beforehand, where there is network) prepares the
wheels; docs/gpu_setup.md has the two commands. It prints a ``PASS``/``FAIL`` line per check
and each section's wall time, and writes the markdown report, a ``.json`` of every raw number
and a ``.png`` plot next to ``--out``.

Sections, in order (the plan shrinks to fit ``--budget-s``: rows that would not fit are
skipped and listed, largest sizes last):

1. correctness, every family's smallest variant: fused == explicit attention in float32 with
   TF32 off (1e-4), the reference cases (float64 at 1e-7, float32 within 3x the official
   model's own gap), bf16 and fp16 autocast within the bounds established on CPU,
   channels-last == NCHW weights, with_cp gradients == plain;
2. SDPA kernels: every attention call of every family at the detection size, in fp16 and
   bf16: the kernel PyTorch's dispatcher picks, which kernels take it when forced, and the
   CPU prediction (``mmhat.utils.sdpa``) confirmed or refuted; FAIL where a call runs the
   math fallback although an efficient kernel takes it;
3. the device's ceiling: a large bf16 and a TF32 matmul;
4. inference at 800x1216, batch 2: latency, images/s, peak memory, share of the ceiling, in
   TF32, bf16 and fp16 autocast; channels-last vs NCHW; fused vs explicit attention; peers
   (Swin-T, PVTv2-B2, ResNet-50) at the same input;
5. a training step (forward + backward) with fp16 autocast + GradScaler and with bf16, with
   and without ``with_cp``: time, peak memory, share of the ceiling; 20 real training steps
   per family and precision without NaN/Inf.

``--device cpu --quick`` runs the same plan at tiny sizes in under 3 minutes (CI runs it so
that the script cannot rot before a GPU shows up).
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
warnings.filterwarnings('ignore')

import torch  # noqa: E402

#: bounds on max|low - fp32| / max|fp32| per stage, established on the CPU (tests/test_export.py)
LOW_PRECISION_RTOL = {'bf16': 5e-2, 'fp16': 6e-3}
PEER_KEYS = ('swin-t', 'pvtv2-b2', 'r50')


@dataclass
class Plan:
    """Sizes and repetitions: the full plan for a GPU, a quick one for the CPU."""
    check_size: Tuple[int, int]
    autocast_size: Tuple[int, int]
    sdpa_size: Tuple[int, int]
    sdpa_batch: int
    infer_sizes: Tuple[Tuple[int, int], ...]
    train_size: Tuple[int, int]
    batch: int
    warmup: int
    runs: int
    nan_steps: int
    matmul_n: int
    precisions: Tuple[str, ...]  # inference
    train_precisions: Tuple[str, ...]
    nan_precisions: Tuple[str, ...]  # the steps checked for NaN/Inf

    @classmethod
    def make(cls, quick: bool, device: str) -> 'Plan':
        cuda = device.startswith('cuda')
        fp32 = 'tf32' if cuda else 'fp32'
        if quick:
            return cls(check_size=(64, 72), autocast_size=(64, 96), sdpa_size=(128, 160),
                       sdpa_batch=1, infer_sizes=((64, 96), ), train_size=(64, 96), batch=1,
                       warmup=1, runs=2, nan_steps=3, matmul_n=256 if not cuda else 4096,
                       precisions=(fp32, 'bf16') if not cuda else (fp32, 'bf16', 'fp16'),
                       # CPUs without native bf16 run autocast 10x slower than float32:
                       # the quick CPU run times float32 steps and checks bf16 steps only
                       train_precisions=('fp32', ) if not cuda else ('fp16', 'bf16'),
                       nan_precisions=('bf16', ) if not cuda else ('fp16', 'bf16'))
        return cls(check_size=(113, 97), autocast_size=(200, 264), sdpa_size=(800, 1216),
                   sdpa_batch=2, infer_sizes=((512, 512), (800, 1216)), train_size=(800, 1216),
                   batch=2, warmup=3, runs=10, nan_steps=20, matmul_n=8192 if cuda else 2048,
                   precisions=(fp32, 'bf16', 'fp16'), train_precisions=('fp16', 'bf16'),
                   nan_precisions=('fp16', 'bf16'))

    def available(self, device: str) -> Tuple['Plan', List[str]]:
        """The plan without the low precisions this torch lacks on ``device`` (torch 2.1 has
        no fp16 autocast on the CPU, nor a CPU GradScaler), and what was left out."""
        from mmhat import compat
        from mmhat.utils.benchmark import AUTOCAST
        device_type = torch.device(device).type
        missing = [p for p, dtype in AUTOCAST.items()
                   if not compat.autocast_supports(device_type, dtype)]
        notes = [f'{p} autocast on {device_type}: not in torch {torch.__version__}'
                 for p in missing]
        untrainable = list(missing)
        if 'fp16' not in missing:
            try:
                compat.grad_scaler(device_type)
            except compat.Unsupported as e:
                untrainable.append('fp16')
                notes.append(f'fp16 training steps on {device_type}: {e}')

        def keep(precisions: Tuple[str, ...], drop: List[str]) -> Tuple[str, ...]:
            return tuple(p for p in precisions if p not in drop)

        plan = dataclasses.replace(
            self, precisions=keep(self.precisions, missing),
            train_precisions=keep(self.train_precisions, untrainable),
            nan_precisions=keep(self.nan_precisions, untrainable))
        return plan, notes


@dataclass
class Check:
    section: str
    name: str
    passed: bool
    detail: str


@dataclass
class Report:
    """Everything the run found, as it goes."""
    device: str
    budget_s: float
    started: float = field(default_factory=time.perf_counter)
    checks: List[Check] = field(default_factory=list)
    sections: Dict[str, float] = field(default_factory=dict)
    skipped: List[str] = field(default_factory=list)
    unavailable: List[str] = field(default_factory=list)  # what this torch cannot run
    data: Dict[str, Any] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def check(self, section: str, name: str, passed: bool, detail: str) -> bool:
        self.checks.append(Check(section, name, bool(passed), detail))
        print(f'{"PASS" if passed else "FAIL"} {name}: {detail}', flush=True)
        return passed

    @contextlib.contextmanager
    def section(self, name: str):
        print(f'== {name}', flush=True)
        t0 = time.perf_counter()
        try:
            yield
        except Exception as e:  # a broken section is a FAIL, the run goes on
            self.check(name, f'{name} ran', False, f'{type(e).__name__}: {e}'.splitlines()[0])
            traceback.print_exc()
        finally:
            self.sections[name] = time.perf_counter() - t0
            print(f'-- {name}: {self.sections[name]:.1f} s (total {self.elapsed():.1f} s of '
                  f'{self.budget_s:.0f})', flush=True)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def rel_errors(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> List[float]:
    """``max|a - b| / max|b|`` per stage, in float64."""
    return [((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
            for a, b in zip(outs, refs)]


def worst(errs: Sequence[float], bars: Sequence[float]) -> Tuple[bool, str]:
    ok = all(e <= b for e, b in zip(errs, bars))
    return ok, ' / '.join(f'{e:.1e}' for e in errs) + (
        f' (bar {bars[0]:.0e})' if len(set(bars)) == 1 else
        ' (bars ' + ' / '.join(f'{b:.0e}' for b in bars) + ')')


def image(batch: int, hw: Tuple[int, int], device: str, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(seed)).to(device)


def smallest(cls, device: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cls(arch=cls.smallest_arch, **kwargs)
    model.init_weights()
    return model.to(device)


def families() -> List[type]:
    import mmhat.models  # noqa: F401
    from mmhat.models.backbones import registered_families
    return registered_families()


# ---------------------------------------------------------------------------------------
# 0. What is here
# ---------------------------------------------------------------------------------------
def environment(report: Report) -> bool:
    info: Dict[str, Any] = dict(python=sys.version.split()[0], torch=torch.__version__,
                                cuda=torch.version.cuda,
                                cuda_available=torch.cuda.is_available())
    for name in ('mmengine', 'mmcv', 'mmcv.ops', 'mmdet', 'mmseg', 'timm', 'numpy',
                 'matplotlib'):
        try:
            module = __import__(name, fromlist=['_'])
            info[name] = getattr(module, '__version__', 'yes')
        except Exception as e:
            info[name] = f'missing ({type(e).__name__})'
    report.data['environment'] = info
    print('   ' + ', '.join(f'{k} {v}' for k, v in info.items()), flush=True)
    if report.device.startswith('cuda') and not torch.cuda.is_available():
        report.check('environment', 'CUDA device', False, 'this torch sees no CUDA device')
        return False
    try:
        fams = families()
    except Exception as e:
        report.check('environment', 'mmhat.models imports', False,
                     f'{type(e).__name__}: {e}'.splitlines()[0])
        return False
    report.check('environment', 'mmhat.models imports', bool(fams),
                 ', '.join(c.__name__ for c in fams) + (
                     '' if not str(info['mmcv.ops']).startswith('missing') else
                     ' (without compiled mmcv ops)'))
    return bool(fams)


# ---------------------------------------------------------------------------------------
# 1. Correctness
# ---------------------------------------------------------------------------------------
def correctness(report: Report, plan: Plan) -> None:
    from mmhat import testing as R
    from mmhat import compat
    from mmhat.utils.benchmark import AUTOCAST, attention_path, output_loss, precision_context
    device = report.device
    dev = torch.device(device)
    tmp = Path(tempfile.mkdtemp(prefix='mmhat_gpu_check_'))
    for cls in families():
        name = cls.__name__
        x = image(2, plan.check_size, device)
        model = smallest(cls, device).eval()
        with torch.no_grad(), precision_context('fp32', dev):
            with attention_path('fused'):
                fused = model(x)
            if cls.fused_attention:
                with attention_path('explicit'):
                    explicit = model(x)
                report.check('correctness', f'{name} fused == explicit (fp32, TF32 off)',
                             *worst(rel_errors(fused, explicit), [1e-4] * 4))
            nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
            report.check('correctness', f'{name} channels-last == NCHW weights',
                         *worst(rel_errors(fused, nchw(x)), [1e-4] * 4))
        # the reference case, float64 and float32
        case_name = f'{cls.reference_name}-{cls.smallest_arch}'
        case = R.load_case(case_name)
        ckpt = R.write_official_checkpoint(case_name, tmp / f'{case_name}.pth')
        ref = cls(arch=cls.smallest_arch, init_cfg=dict(type='Pretrained', checkpoint=str(ckpt)))
        ref.init_weights()
        ref = ref.to(device).eval()
        with torch.no_grad(), precision_context('fp32', dev):
            outs = ref(case['input'].to(device))
            report.check('correctness', f'{name} equals the official model, float32',
                         *worst(rel_errors(outs, case['outputs']), R.float32_bars(case_name)))
            outs = ref.double()(case['input'].double().to(device))
            report.check('correctness', f'{name} equals the official model, float64',
                         *worst(rel_errors(outs, case['outputs']), [R.FLOAT64_REL] * 4))
        # autocast against fp32
        x = image(1, plan.autocast_size, device, seed=1)
        with torch.no_grad(), precision_context('fp32', dev):
            base = model(x)
        for precision, bar in LOW_PRECISION_RTOL.items():
            if not compat.autocast_supports(dev.type, AUTOCAST[precision]):
                continue  # listed under report.unavailable
            with torch.no_grad(), precision_context(precision, dev):
                low = model(x)
            finite = all(torch.isfinite(o).all() for o in low)
            ok, detail = worst(rel_errors(low, base), [bar] * 4)
            report.check('correctness', f'{name} {precision} autocast vs fp32', ok and finite,
                         detail + ('' if finite else ', NON-FINITE values'))
        # with_cp gradients
        torch.manual_seed(0)
        plain = smallest(cls, device).train()
        cp = copy.deepcopy(plain)
        cp.with_cp = True
        x = image(2, plan.check_size, device, seed=2)
        grads = []
        for m in (plain, cp):
            with precision_context('fp32', dev):
                output_loss(m(x)).backward()
            grads.append([p.grad for p in m.parameters()])
        missing = sum(g is None for g in grads[0])
        err = max(((a - b).abs().max() / (b.abs().max() + 1e-12)).item()
                  for a, b in zip(grads[1], grads[0]) if b is not None and b.abs().max() > 0)
        report.check('correctness', f'{name} with_cp gradients == plain',
                     err <= 1e-4 and not missing,
                     f'max relative {err:.1e} (bar 1e-04), {missing} parameters without grad')
        del model, ref, plain, cp
        if dev.type == 'cuda':
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# 2. SDPA kernels
# ---------------------------------------------------------------------------------------
def sdpa_kernels(report: Report, plan: Plan) -> None:
    """``mmhat.utils.sdpa.check_on_device`` at the detection size, as checks."""
    from mmhat.utils import sdpa
    from mmhat import compat
    device_type = torch.device(report.device).type
    results = sdpa.check_on_device(sizes=[plan.sdpa_size], batch=plan.sdpa_batch,
                                   device=report.device,
                                   dtypes=[d for d in sdpa.LOW_PRECISION
                                           if compat.autocast_supports(device_type, d)])
    calls = [r for r in results if 'chosen' in r]
    for head in (r for r in results if 'layout' in r):
        forward = {k: v for k, v in head.items() if k.startswith('forward')}
        report.check('sdpa', f'{head["family"]} calls on the device == the CPU recording',
                     head['layout'], 'shapes, strides, offsets and masks' +
                     ('' if head['layout'] else ': they differ, the prediction is of other '
                      'calls'))
        report.check('sdpa', f'{head["family"]} forward under fp16/bf16 autocast',
                     all(v == 'ok' for v in forward.values()),
                     ', '.join(f'{k.split(".")[-1]} {v}' for k, v in forward.items()))
    for r in calls:
        dtype = str(r['dtype']).split('.')[-1]
        fused_ok = [b for b in sdpa.FUSED_BACKENDS if str(r.get(b, '')).startswith('ok')]
        confirmed = '' if r['predicted'] is None else (
            f'; predicted {r["predicted"]}: ' + ('confirmed' if r['predicted'] == r['chosen']
                                                 else 'REFUTED'))
        report.check('sdpa', f'{r["family"]} stage {r["stage"]} {dtype} q{list(r["q_shape"])} '
                     f'n_k {r["n_k"]} mask {r["mask"]}',
                     not (r['chosen'] == 'math' and fused_ok),
                     f'dispatcher picks {r["chosen"]}; forced: ' +
                     ', '.join(f'{b} {r[b]}' for b in sdpa.FUSED_BACKENDS if b in r) + confirmed)
    report.data['sdpa'] = [dict(r, dtype=str(r['dtype']).split('.')[-1], hw=list(r['hw']))
                           for r in calls]


# ---------------------------------------------------------------------------------------
# 3-5. Ceiling, inference, training
# ---------------------------------------------------------------------------------------
def ceiling(report: Report, plan: Plan) -> None:
    from mmhat.utils.benchmark import matmul_rate
    cuda = report.device.startswith('cuda')
    rates = {}
    for precision in (('tf32', 'bf16') if cuda else ('fp32', 'bf16')):
        r = matmul_rate(plan.matmul_n, 5 if cuda else 3, report.device, torch.get_num_threads(),
                        precision)
        rates[precision] = r
        print(f'   {precision} matmul {plan.matmul_n}^3: {r["gflops_per_s"]:.1f} GFLOP/s',
              flush=True)
    # fp16 shares the bf16 tensor-core rate; fp32 rows are measured against the float32 one
    rates['fp16'] = rates['bf16']
    report.data['ceiling'] = rates


def phase(report: Report) -> str:
    """CUDA's allocator counts peak memory exactly in this process; on the CPU only a fresh
    process per row does (``tools/benchmark.py``), so the CPU rows here are timed only."""
    return 'all' if report.device.startswith('cuda') else 'time'


def measure_plan(report: Report, rows: List, estimate_s: float) -> List:
    """Measure ``rows`` in this process while the budget allows; the rest are skipped."""
    from mmhat.utils import benchmark as B
    fmt = B.fmt
    results, reserve = [], 15.0
    last = estimate_s
    for row in rows:
        if report.remaining() < last + reserve:
            report.skipped.append(row.describe())
            continue
        t0 = time.perf_counter()
        try:
            res = B.measure(row)
        except Exception as e:
            res = B.Result.of(row, error=f'{type(e).__name__}: {e}'.splitlines()[0][:300])
        if row.device.startswith('cuda'):
            torch.cuda.empty_cache()
        last = max(time.perf_counter() - t0, 0.5)
        results.append(res)
        what = (f'{res.latency_s * 1e3:8.1f} ms {fmt(res.throughput, "7.2f")} img/s '
                f'{fmt(res.peak_mem_mb, "8.0f")} MB' if res.ok else res.error)
        print(f'   {row.describe()}: {what}', flush=True)
    if len(results) < len(rows):
        print(f'   skipped {len(rows) - len(results)} rows (budget)', flush=True)
    return results


def model_specs():
    from mmhat.utils import benchmark as B
    ours = [B.mmhat_spec(f'mmhat.{cls.__name__}') for cls in families()]
    peers = []
    for key in PEER_KEYS:
        try:
            peers.append(B.peer_spec(key))
        except Exception as e:  # neither mmdet nor timm: no peers, said so
            print(f'   peer {key}: {type(e).__name__}: {e}', flush=True)
    return ours, peers


def inference(report: Report, plan: Plan) -> None:
    from mmhat.utils.benchmark import Row
    ours, peers = model_specs()
    fast = report.device.startswith('cuda')
    common = dict(mode='infer', batch=plan.batch, threads=torch.get_num_threads(),
                  device=report.device, runs=plan.runs, warmup=plan.warmup, max_seconds=30.0,
                  phase=phase(report))
    low = 'fp16' if 'fp16' in plan.precisions else 'bf16'
    rows = []
    for hw in plan.infer_sizes:  # largest sizes last
        detection = hw == plan.infer_sizes[-1]
        for spec in ours + peers:
            for precision in (plan.precisions if detection else (low, )):
                rows.append(Row(model=spec, size=hw, precision=precision, flops=precision == low,
                                attn='fused' if spec.switchable_attn else None,
                                layout='channels_last' if spec.is_mmhat else None, **common))
        if detection:
            for spec in ours:
                rows.append(Row(model=spec, size=hw, precision=low, layout='nchw',
                                attn='fused' if spec.switchable_attn else None, **common))
                if spec.switchable_attn:
                    rows.append(Row(model=spec, size=hw, precision=low, layout='channels_last',
                                    attn='explicit', **common))
    results = measure_plan(report, rows, 5.0 if fast else 3.0)
    report.data['inference'] = results


def training(report: Report, plan: Plan) -> None:
    from mmhat.utils.benchmark import Row, train_steps_finite
    ours, peers = model_specs()
    common = dict(mode='train', batch=plan.batch, threads=torch.get_num_threads(),
                  device=report.device, runs=plan.runs, warmup=plan.warmup, max_seconds=30.0,
                  phase=phase(report))
    rows = []
    for spec in ours + peers:
        for precision in plan.train_precisions:
            for cp in ((False, True) if spec.supports_cp else (False, )):
                rows.append(Row(model=spec, size=plan.train_size, precision=precision,
                                with_cp=cp, attn='fused' if spec.switchable_attn else None,
                                layout='channels_last' if spec.is_mmhat else None, **common))
    report.data['training'] = measure_plan(report, rows, 8.0)
    nan = []
    for spec in ours:
        for precision in plan.nan_precisions:
            if report.remaining() < 20:
                report.skipped.append(f'{spec.label} {precision} {plan.nan_steps} steps')
                continue
            row = Row(model=spec, size=plan.train_size, precision=precision,
                      attn='fused' if spec.switchable_attn else None, **common)
            out = train_steps_finite(row, plan.nan_steps)
            nan.append(dict(model=spec.label, precision=precision, **out))
            report.check('training', f'{spec.label} {plan.nan_steps} {precision} steps finite',
                         out['finite'], f'loss {out["losses"][0]:.3g} -> {out["losses"][-1]:.3g}'
                         f', {out["skipped_steps"]} steps skipped by the scaler')
    report.data['nan_checks'] = nan


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
def share(result, ceiling: Dict[str, Any], train: bool = False,
          flops: Optional[Dict] = None) -> Optional[float]:
    """Achieved FLOP/s as a share of the matmul ceiling of the row's precision; a training
    step counts 3x the forward's FLOPs (forward + backward of activations and weights)."""
    g = (flops or {}).get((result.model_key, tuple(result.size)), result.gflops)
    rate = ceiling.get(result.precision, {}).get('gflops_per_s')
    if not result.ok or g is None or not rate:
        return None
    return (3 if train else 1) * g * result.batch / result.latency_s / rate


def write_report(report: Report, plan: Plan, out: Path, argv: Sequence[str]) -> None:
    from mmhat.utils import benchmark as B
    f = B.fmt
    infer = report.data.get('inference', [])
    train = report.data.get('training', [])
    ceil = report.data.get('ceiling', {})
    flops = {(r.model_key, tuple(r.size)): r.gflops for r in infer if r.gflops is not None}
    for r in infer:
        r.gflops = flops.get((r.model_key, tuple(r.size)))
    machine = B.machine_info(report.device, torch.get_num_threads())
    lines = [f'# GPU check: {machine["device_name"]}', '',
             f'- command: `python tools/gpu_check.py {" ".join(argv)}`',
             f'- device: {machine["device"]} ({machine["device_name"]}'
             + (f', compute capability {machine.get("capability")}, {machine.get("memory_gb")} '
                f'GB, CUDA {machine.get("cuda")}, cuDNN {machine.get("cudnn")}'
                if report.device.startswith('cuda') else '') + f'), torch {machine["torch"]}, '
             f'mmengine {machine["mmengine"]}, mmcv {machine["mmcv"]}, mmdet {machine["mmdet"]}, '
             f'timm {machine["timm"]}',
             f'- wall time: {report.elapsed():.0f} s of a {report.budget_s:.0f} s budget ('
             + ', '.join(f'{k} {v:.0f} s' for k, v in report.sections.items()) + ')',
             f'- checks: {sum(c.passed for c in report.checks)} passed, '
             f'{sum(not c.passed for c in report.checks)} failed'
             + (f'; {len(report.skipped)} rows skipped for the budget' if report.skipped
                else ''), '']
    if ceil:
        lines += ['- ceiling: ' + ', '.join(f'{p} matmul {r["n"]}^3 {r["gflops_per_s"]:.0f} '
                                            f'GFLOP/s' for p, r in ceil.items() if p != 'fp16')
                  + ' (fp16 rows are set against the bf16 rate)', '']
    lines += ['## Checks', ''] + B.markdown_table(report.checks, [
        ('section', lambda c: c.section), ('check', lambda c: c.name),
        ('result', lambda c: 'PASS' if c.passed else '**FAIL**'), ('detail', lambda c: c.detail)])
    if report.data.get('sdpa'):
        from mmhat.utils.sdpa import FUSED_BACKENDS
        lines += ['', '## SDPA kernels (what the dispatcher picks, what takes each call when '
                  'forced alone, with its error against fp32 math, and the CPU prediction)',
                  ''] + B.markdown_table(report.data['sdpa'], [
                      ('model', lambda r: r['family']), ('stage', lambda r: r['stage']),
                      ('dtype', lambda r: r['dtype']), ('q', lambda r: list(r['q_shape'])),
                      ('keys', lambda r: r['n_k']), ('mask', lambda r: r['mask']),
                      ('picked', lambda r: r['chosen']),
                      ('predicted', lambda r: r['predicted'] or '—')] + [
                      (b, (lambda b: lambda r: r.get(b, '—'))(b)) for b in FUSED_BACKENDS])
    peers = {'Swin-T', 'PVTv2-B2', 'ResNet-50'}
    if infer:
        vs = {}
        for label in sorted(peers & {r.model for r in infer}):
            key = next(r.model_key for r in infer if r.model == label)
            vs[label] = {id(p.result): p for p in B.pairs(
                infer, dict(model_key=(B.ANY, key), attn=(B.ANY, None), layout=(B.ANY, None)),
                same_model=False)}
        lines += ['', f'## Inference, batch {plan.batch}', ''] + B.markdown_table(
            [r for r in infer if r.ok], [
                ('model', lambda r: r.model), ('input', lambda r: B.fmt_size(r.size)),
                ('precision', lambda r: r.precision), ('path', lambda r: r.path()),
                ('latency (ms)', lambda r: f(r.latency_s * 1e3, '.1f')),
                ('img/s', lambda r: f(r.throughput, '.1f')),
                ('peak mem (MB)', lambda r: f(r.peak_mem_mb, '.0f')),
                ('GFLOPs', lambda r: f(r.gflops, '.1f')),
                ('% of ceiling', lambda r: f(share(r, ceil) and 100 * share(r, ceil), '.0f'))] + [
                (f'speed vs {label}', (lambda label: lambda r: f(
                    vs[label][id(r)].speedup if id(r) in vs[label] else None))(label))
                for label in vs])
        for title, vary in (('Channels-last vs NCHW weights (speed-up of channels-last)',
                             dict(layout=('channels_last', 'nchw'))),
                            ('Fused vs explicit attention (speed-up of fused)',
                             dict(attn=('fused', 'explicit')))):
            found = B.pairs(infer, vary)
            if found:
                lines += ['', f'## {title}', ''] + B.markdown_table(found, [
                    ('model', lambda p: p.result.model), ('input', lambda p: B.fmt_size(p.result.size)),
                    ('precision', lambda p: p.result.precision),
                    ('speed-up', lambda p: f(p.speedup)), ('memory ratio', lambda p: f(p.mem_ratio))])
    if train:
        cp = {id(p.result): p for p in B.pairs(train, dict(with_cp=(True, False)))}
        lines += ['', f'## Training step (forward + backward), batch {plan.batch}', '']
        lines += B.markdown_table([r for r in train if r.ok], [
            ('model', lambda r: r.model), ('input', lambda r: B.fmt_size(r.size)),
            ('precision', lambda r: r.precision + (' + GradScaler' if r.precision == 'fp16'
                                                   else '')),
            ('with_cp', lambda r: 'on' if r.with_cp else 'off'),
            ('step (ms)', lambda r: f(r.latency_s * 1e3, '.1f')),
            ('peak mem (MB)', lambda r: f(r.peak_mem_mb, '.0f')),
            ('% of ceiling (3x forward FLOPs)',
             lambda r: f(share(r, ceil, True, flops) and 100 * share(r, ceil, True, flops), '.0f')),
            ('with_cp / plain memory', lambda r: f(cp[id(r)].mem_ratio if id(r) in cp else None)),
            ('with_cp / plain time', lambda r: f(cp[id(r)].time_ratio if id(r) in cp else None))])
    errors = [r for r in infer + train if not r.ok]
    if errors:
        lines += ['', '## Rows that failed', ''] + [f'- {r.model} {B.fmt_size(r.size)} {r.mode} '
                                                   f'{r.precision}: {r.error}' for r in errors]
    if report.skipped:
        lines += ['', '## Skipped for the budget', ''] + [f'- {s}' for s in report.skipped]
    if report.unavailable:
        lines += ['', '## Not available on this torch', ''] + [f'- {s}'
                                                              for s in report.unavailable]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text('\n'.join(lines) + '\n')
    raw = dict(machine=machine, plan=dataclasses.asdict(plan), wall_s=report.elapsed(),
               sections=report.sections, checks=[dataclasses.asdict(c) for c in report.checks],
               skipped=report.skipped, environment=report.data.get('environment'),
               ceiling=ceil, sdpa=report.data.get('sdpa'),
               inference=[B.result_to_dict(r) for r in infer],
               training=[B.result_to_dict(r) for r in train],
               nan_checks=report.data.get('nan_checks'))
    out.with_suffix('.json').write_text(json.dumps(raw, indent=1, default=str) + '\n')
    if any(r.ok for r in infer):
        try:
            B.plot_results(infer, f'{machine["device_name"]}, batch {plan.batch}, torch '
                           f'{machine["torch"]}', out.with_suffix('.png'))
        except Exception as e:  # no matplotlib: the tables are the report
            print(f'   no plot: {type(e).__name__}: {e}', flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('docs/benchmarks/gpu.md'))
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--quick', action='store_true', help='tiny sizes, few runs')
    parser.add_argument('--budget-s', type=float, default=420.0,
                        help='wall time the plan must fit in (default 420)')
    args = parser.parse_args(argv)
    with contextlib.suppress(ImportError):  # no per-checkpoint INFO lines in this tool
        from mmengine.logging import MMLogger
        MMLogger.get_current_instance().setLevel('WARNING')
    report = Report(device=args.device, budget_s=args.budget_s)
    plan, report.unavailable = Plan.make(args.quick, args.device).available(args.device)
    for what in report.unavailable:
        print(f'SKIP {what}', flush=True)
    if args.device == 'cpu':
        torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    with report.section('environment'):
        ready = environment(report)
    if ready:
        for name, fn in (('correctness', correctness), ('sdpa', sdpa_kernels),
                         ('ceiling', ceiling), ('inference', inference),
                         ('training', training)):
            if report.remaining() < 20 and name != 'ceiling':
                report.skipped.append(f'section {name}')
                continue
            with report.section(name):
                fn(report, plan)
    write_report(report, plan, args.out, argv)
    failed = [c for c in report.checks if not c.passed]
    print(f'{"FAIL" if failed else "PASS"} gpu_check: {len(report.checks) - len(failed)} '
          f'checks passed, {len(failed)} failed, {report.elapsed():.0f} s; report: {args.out}',
          flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
