"""Speed, memory and FLOP efficiency of mmhat backbones, measured against peers in one run
(the measuring itself is :mod:`mmhat.utils.benchmark`; this is its command line).

    python tools/benchmark.py mmhat.HATNet --arch tiny            # + Swin-T, PVTv2-B1/B2, R50
    python tools/benchmark.py mmhat.ShuntedTransformer:tiny mmhat.ShuntedTransformer:small \\
        --peers none --modes train --infer-sizes 800x1216 --sizes 800x1333 --out shunted.md
    python tools/benchmark.py mmhat.HATNet:tiny --attn both --device cuda --plot
    python tools/benchmark.py mmhat.GroupMixFormer:tiny --peers none --modes infer --compile both
    python tools/benchmark.py mmhat.HATNet:tiny --peers none --attn both --layout both \\
        --modes infer --infer-sizes 800x1216          # + ours vs the unfused NCHW reference
    python tools/benchmark.py configs/det/maskrcnn_hatnet_t_coco.py --peers swin-t \
        --modes train --train-sizes 800x1216 --interleave models   # models take turns
    python tools/benchmark.py configs/det/maskrcnn_hatnet_t_coco.py --peers swin-t \
        --modes train --interleave alone --processes 3   # each alone, 3 turns of processes
    python tools/benchmark.py --quick                            # CI smoke run (~20 s)
    python tools/benchmark.py mmhat.HATNet:tiny --peers swin-t r50 --profile \
        --train-sizes 800x1216 --profile-batches 1 2 --out profile.md   # where a step goes

Rows are every (model, input size, mode, attention path, conv weight layout, with_cp,
torch.compile); the markdown report has one table per mode, the ratio tables (fused vs
explicit, ours vs the faithful unfused reference, compiled vs eager, with_cp vs plain) and
the machine's state; the JSON next to it every raw number.
"""
import argparse
import dataclasses
import gc
import itertools
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

# Before torch is imported (its OpenMP runtime reads this once): passive waiting keeps a
# contended run from spinning.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

import torch  # noqa: E402

from mmhat.utils import benchmark as B  # noqa: E402

DEFAULT_INFER_SIZES = ('224', '512', '800x1216')
DEFAULT_TRAIN_SIZES = ('800x1216', )
QUICK_MODEL = 'mmhat.ShuntedTransformer:tiny'
QUICK_SIZE = '128'
DEFAULT_PEERS = ('swin-t', 'pvtv2-b1', 'pvtv2-b2', 'r50')
#: the peer the ratio columns refer to when ``--ref`` is not given, in order of preference
REF_PREFERENCE = ('pvtv2-b2', 'r50', 'swin-t', 'pvtv2-b1')


#: the report's line on rows timed together (``--interleave``)
INTERLEAVED = {
    'kernels': '- rows that differ only in their kernels: timed in one process per model, input '
               'and with_cp, alternating the configurations step by step (`--interleave`)',
    'models': '- rows of one input size, mode and batch: timed in one process, the models, '
              'their kernel configurations and with_cp on and off taking turns step by step '
              '(`--interleave models`); memory in a fresh process per row',
    'alone': '- rows of one input size, mode and batch: each timed alone in a fresh process, '
             'the rows taking turns process by process (`--interleave alone`); memory in a '
             'fresh process per row',
}


def plan_rows(models: Sequence[B.ModelSpec], args) -> List[B.Row]:
    """Every (size, model, mode, attention, layout, with_cp, compile) to measure; sizes
    outermost so the rows compared with each other run close together in time."""
    parse = B.parse_size
    infer = [parse(s) for s in args.infer_sizes] + [parse(s) for s in args.sizes]
    train = [parse(s) for s in args.train_sizes] + [parse(s) for s in args.sizes]
    sizes = list(dict.fromkeys(infer + train))
    both = {'off': [False], 'on': [True], 'both': [False, True]}
    attn_paths = ['fused', 'explicit'] if args.attn == 'both' else [args.attn]
    layouts = ['channels_last', 'nchw'] if args.layout == 'both' else [args.layout]
    rows, counted = [], set()
    for hw in sizes:
        for m in models:
            for mode in args.modes:
                if hw not in (infer if mode == 'infer' else train):
                    continue
                for batch, attn, layout, kernels, cp, comp in itertools.product(
                        args.batch_size, attn_paths if m.switchable_attn else [None],
                        layouts if m.is_mmhat else [None],
                        kernel_sets(m, args.kernels) or [None],
                        both[args.cp] if mode == 'train' else [False], both[args.compile]):
                    if (cp and not m.supports_cp) or (kernels == 'no-attn-replay' and not cp):
                        continue  # the attention replay only acts under with_cp
                    flops = mode == 'infer' and (m.key, hw) not in counted
                    if flops:
                        counted.add((m.key, hw))
                    rows.append(B.Row(model=m, size=hw, mode=mode, attn=attn, layout=layout,
                                      kernels=kernels, with_cp=cp, compile=comp, batch=batch,
                                      threads=args.threads, device=args.device, runs=args.runs,
                                      warmup=args.warmup, max_seconds=args.max_seconds,
                                      flops=flops))
    return rows


def kernel_sets(m: B.ModelSpec, choice: str) -> List[str]:
    """The ``kernels`` of a model's rows for ``--kernels``: 'both' is mmhat's and plain,
    'ablate' adds all-but-one of each of the family's features."""
    if not m.kernel_features:
        return []
    if choice in ('mmhat', 'plain'):
        return [choice]
    return ['mmhat', 'plain'] + ([f'no-{f}' for f in m.kernel_features]
                                 if choice == 'ablate' else [])


def summaries(results: Sequence[B.Result]) -> Dict[str, List[B.Pair]]:
    """The ratio tables: pairs of rows of one model, size and mode differing on one axis
    (ours vs the faithful reference: on the attention path and the weight layout)."""
    eager = [r for r in results if not r.compile]
    return dict(
        fused_vs_explicit=B.pairs(results, dict(attn=('fused', 'explicit'))),
        vs_reference=(B.pairs(eager, dict(attn=('fused', 'explicit'),
                                          layout=('channels_last', 'nchw'))) +
                      B.pairs([r for r in eager if r.attn is None],
                              dict(layout=('channels_last', 'nchw')))),
        compiled_vs_eager=B.pairs(results, dict(compile=(True, False))),
        kernels_vs_plain=B.pairs(results, dict(kernels=('mmhat', 'plain'))),
        kernel_ablation=[p for f in B.KERNEL_FEATURES
                         for p in B.pairs(results, dict(kernels=('mmhat', f'no-{f}')))],
        with_cp_vs_plain=B.pairs([r for r in results if r.mode == 'train'],
                                 dict(with_cp=(True, False))))


def peer_ratios(results: Sequence[B.Result], ref: Optional[str]) -> Dict[int, B.Pair]:
    """Each row against the reference peer's row of the same size, mode, with_cp, compile."""
    if ref is None:
        return {}
    pairs = B.pairs(results, dict(model_key=(B.ANY, ref), attn=(B.ANY, None),
                                  layout=(B.ANY, None), kernels=(B.ANY, None)),
                    same_model=False)
    return {id(p.result): p for p in pairs}


def to_markdown(report: Dict[str, Any], results: Sequence[B.Result],
                pairs: Dict[str, List[B.Pair]], vs_ref: Dict[int, B.Pair]) -> str:
    """The markdown report."""
    m, mm, st = report['machine'], report['matmul'], report['settings']
    ref = st['ref_label']
    processes = st.get('processes') or 1  # reports written before --processes lack it
    mem_method = next((r.mem_method for r in results if r.mem_method), '—')
    f = B.fmt
    lines = [
        '# mmhat backbone benchmark', '',
        f'- device: {m["device"]} ({m["device_name"]}), torch {m["torch"]}, mmdet {m["mmdet"]}, '
        f'threads {m["threads"]} of {m["cpu_count"]} cores, OMP_WAIT_POLICY='
        f'{m["omp_wait_policy"]}',
        f'- machine load (1/5/15 min): start {m["load_average_start"]}, end '
        f'{m["load_average_end"]}; foreign CPU during the rows: median '
        f'{f(m["foreign_cores_median"])} cores, max {f(m["foreign_cores_max"])}; CPU the '
        f'measured process got: median {f(m["own_cpu_share_median"])} cores (of '
        f'{m["threads"]} thread(s) asked)',
        f'- float32 matmul {mm["n"]}x{mm["n"]}: {mm["latency_s"] * 1e3:.1f} ms median = '
        f'{mm["gflops_per_s"]:.1f} GFLOP/s (1 FMA = 1 FLOP, as get_flops counts)',
        f'- batch {batches_text(st["batch_size"])}; median of up to {st["runs"]} runs after {st["warmup"]} '
        f'warm-up; peak memory = rise during the first pass of a separate process '
        f'({mem_method})'] + ([
            INTERLEAVED[st.get('interleave') if st.get('interleave') in INTERLEAVED
                        else 'kernels']]
            if st.get('interleave') == 'alone' or any(r.interleaved for r in results)
            else []) + ([
                (f'- {st["processes"]} turns (`--processes`): latency = median of the '
                 'per-turn medians, a ratio = median of the per-turn ratios'
                 if st.get('interleave') == 'alone' else
                 f'- each group of rows timed together in {st["processes"]} fresh processes, '
                 'one after the other (`--processes`): latency = median of the per-process '
                 'medians, a ratio = median of the per-process ratios')]
                if processes > 1 else []) + ['']

    def cells_or_error(r, cells):
        return cells if r.ok else [f'error: {r.error}']

    several_batches = len({r.batch for r in results}) > 1
    batch_column = [('batch', lambda r: r.batch)] if several_batches else []
    base = [('model', lambda r: r.model), ('input', lambda r: B.fmt_size(r.size))] + \
        batch_column + [('path', lambda r: r.path())]
    timing = [('latency (ms)', lambda r: f(r.latency_s and r.latency_s * 1e3, '.1f')),
              ('img/s', lambda r: f(r.throughput)), ('peak mem (MB)',
                                                     lambda r: f(r.peak_mem_mb, '.0f'))]
    rate = [('GFLOPs', lambda r: f(r.gflops, '.1f')),
            ('GFLOP/s', lambda r: f(r.achieved_gflops_per_s, '.1f')),
            ('% of matmul', lambda r: f(r.matmul_fraction and 100 * r.matmul_fraction, '.0f'))]
    versus = [(f'speed vs {ref}', lambda r: f(vs_ref[id(r)].speedup if id(r) in vs_ref
                                               else None)),
              (f'memory vs {ref}', lambda r: f(vs_ref[id(r)].mem_ratio if id(r) in vs_ref
                                                else None))] if ref else []
    if ref and processes > 1:
        versus.insert(1, ('per process (min-max)',
                          lambda r: per_process_text(vs_ref.get(id(r)))))
    cpu = [('foreign CPU (cores)', lambda r: f(r.foreign_cores)),
           ('own CPU (cores)', lambda r: f(r.own_cpu_share))]
    cp = [('with_cp', lambda r: 'on' if r.with_cp else 'off')]
    for mode, title, columns in (
            ('infer', 'Inference', base + timing + rate + versus + cpu),
            ('train', 'Training step (forward + backward)', base + cp + timing + versus + cpu)):
        rows = [r for r in results if r.mode == mode]
        if rows:
            table = B.markdown_table([r for r in rows if r.ok], columns)
            table += [f'| {r.model} | {B.fmt_size(r.size)} | {r.path()} | error: {r.error} |'
                      for r in rows if not r.ok]
            lines += [f'## {title}', ''] + table + ['']
    pair_base = [('model', lambda p: p.result.model + (' (NCHW)' if p.result.layout == 'nchw'
                                                        else '')),
                 ('input', lambda p: B.fmt_size(p.result.size)), ('mode', lambda p: p.result.mode),
                 ('with_cp', lambda p: 'on' if p.result.with_cp else 'off')] + \
        [('batch', lambda p: p.result.batch)] * several_batches
    sections = [
        ('fused_vs_explicit', 'Fused (SDPA) vs explicit attention',
         pair_base + [('speed-up (fused/explicit)', lambda p: f(p.speedup)),
                      ('memory ratio (fused/explicit)', lambda p: f(p.mem_ratio))]),
        ('vs_reference', 'Ours vs the faithful unfused reference (explicit attention, NCHW '
         'weights)', pair_base + [('ours', lambda p: p.result.path()),
                                  ('reference', lambda p: p.reference.path()),
                                  ('speed-up', lambda p: f(p.speedup)),
                                  ('memory ratio', lambda p: f(p.mem_ratio))]),
        ('compiled_vs_eager', 'torch.compile (inductor) vs eager',
         pair_base[:3] + [('attention', lambda p: p.result.attn or '—')] + pair_base[3:] +
         [('speed-up (compiled/eager)', lambda p: f(p.speedup)),
          ('memory ratio', lambda p: f(p.mem_ratio)),
          ('compile time (s)', lambda p: f(p.result.compile_s, '.0f'))]),
        ('kernels_vs_plain', "mmhat's training kernels vs plain (nn.Conv2d, with_cp recomputing "
         'the attention)',
         pair_base + [('path', lambda p: p.result.path()),
                      ('speed-up (kernels/plain)', lambda p: f(p.speedup)),
                      ('memory ratio (kernels/plain)', lambda p: f(p.mem_ratio))]),
        ('kernel_ablation', 'What each training kernel gives: all of them vs all but one',
         pair_base + [('without', lambda p: p.reference.kernels[3:]),
                      ('speed-up (all/without)', lambda p: f(p.speedup)),
                      ('memory ratio (all/without)', lambda p: f(p.mem_ratio))]),
        ('with_cp_vs_plain', 'Activation checkpointing (with_cp) vs plain, training step',
         pair_base[:2] + pair_base[4:] +  # model, input (, batch)
         [('path', lambda p: p.result.path()),
          ('peak mem plain (MB)', lambda p: f(p.reference.peak_mem_mb, '.0f')),
          ('with_cp (MB)', lambda p: f(p.result.peak_mem_mb, '.0f')),
          ('memory ratio', lambda p: f(p.mem_ratio)),
          ('time ratio', lambda p: f(p.time_ratio))]),
    ]
    for key, title, columns in sections:
        if pairs[key]:
            lines += [f'## {title}', ''] + B.markdown_table(pairs[key], columns) + ['']
    return '\n'.join(lines)


def per_process_text(pair: Optional[B.Pair]) -> str:
    """The per-process ratios of ``pair`` as ``min-max``; ``—`` for none."""
    each = pair.per_process_speedups() if pair is not None else []
    return f'{min(each):.2f}-{max(each):.2f}' if each else '—'


def pair_records(pairs: Dict[str, List[B.Pair]]) -> Dict[str, List[Dict[str, Any]]]:
    """The ratio tables as JSON."""
    return {key: [dict(model=p.result.model, size=p.result.size, mode=p.result.mode,
                       with_cp=p.result.with_cp, path=p.result.path(),
                       ref_path=p.reference.path(), speedup=p.speedup,
                       speedup_by_process=p.per_process_speedups(),
                       time_ratio=p.time_ratio, mem_ratio=p.mem_ratio,
                       mem_mb=p.result.peak_mem_mb, ref_mem_mb=p.reference.peak_mem_mb,
                       compile_s=p.result.compile_s) for p in items]
            for key, items in pairs.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('models', nargs='*',
                   help='registered backbones, optionally with :arch (mmhat.HATNet:tiny), '
                        f'config files (their model.backbone), or peer keys ({", ".join(B.PEERS)})')
    p.add_argument('--arch', help='arch of mmhat models given without :arch (default: the '
                                  'family\'s smallest_arch)')
    p.add_argument('--peers', nargs='+', default=list(DEFAULT_PEERS),
                   help=f'peers measured alongside (default: {" ".join(DEFAULT_PEERS)}); '
                        '"none" for none')
    p.add_argument('--ref', help='the peer the "vs" columns compare with (its key or label, '
                                 'measured in this run; default: PVTv2-B2, else ResNet-50, ... '
                                 'if measured)')
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
    p.add_argument('--kernels', choices=['mmhat', 'plain', 'both', 'ablate'], default='mmhat',
                   help="mmhat's training kernels (CPU convolutions, activation recompute, "
                        "windows in one copy, the folded BatchNorm, with_cp's attention replay; "
                        'mmhat.utils.benchmark.KERNEL_FEATURES), '
                        'plain (none of them), both (a kernels/plain table), or ablate (both, '
                        'and all but one of each: a table of what each gives)')
    p.add_argument('--interleave', nargs='?', const='kernels',
                   choices=['kernels', 'models', 'alone'],
                   help='time rows together in one process, alternating them step by step '
                        '(changes of a few percent show; separate processes differ by up to '
                        '~10%%, a peer by up to 25%% between runs): "kernels" (the default '
                        'when given without a value; with --kernels both/ablate) the kernel '
                        'configurations of a model; "models" every row of one input size, '
                        'mode and batch (models, kernels, with_cp on and off), so that the '
                        'ratios between models and with_cp / plain are as steady as those '
                        'between kernels; memory still in a fresh process per row; "alone" '
                        'the rows of "models", each timed alone in a fresh process, taking '
                        'turns process by process (with --processes N: N turns), as users run '
                        'one model per process: models sharing a process share its heap and '
                        'read up to 30%% apart from alone')
    p.add_argument('--processes', type=int, default=1, metavar='N',
                   help='with --interleave: time each group of rows in N fresh processes, one '
                        'after the other; a row\'s latency is the median of its per-process '
                        'medians and a ratio between rows the median of the per-process '
                        'ratios (each listed in the report): one process\'s ratio moves by '
                        'about +-5%% between runs (models sharing it), one --interleave alone '
                        'turn\'s by about +-10%%')
    p.add_argument('--cp', choices=['off', 'on', 'both'], default='both',
                   help='with_cp for training rows (models without with_cp: off only)')
    p.add_argument('--compile', choices=['off', 'on', 'both'], default='off',
                   help='run the model under torch.compile (inductor); "both" adds eager rows '
                        'and a compiled/eager table. Compilation happens before the measured '
                        'passes and its time is reported separately')
    p.add_argument('--device', default='cpu', help='cpu or cuda[:i]')
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads (default 1: shared 2-core machines, see docstring)')
    p.add_argument('--batch-size', type=int, nargs='+', default=[1],
                   help='batch sizes; each is a row of its own (default: 1)')
    p.add_argument('--runs', type=int, default=5, help='timed passes per row (median)')
    p.add_argument('--warmup', type=int, default=1,
                   help='untimed passes before the timed ones (>= 1)')
    p.add_argument('--max-seconds', type=float, default=60.0,
                   help=f'stop a row\'s timed passes after this long (>= {B.MIN_RUNS} kept)')
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
    p.add_argument('--profile', action='store_true',
                   help='profile one training step per (model, train size, batch) with '
                        'torch.profiler instead of timing: self time per operator, forward vs '
                        'backward, kinds of work, memory (default path: fused, channels-last)')
    p.add_argument('--profile-batches', type=int, nargs='+', default=[1, 2],
                   help='batch sizes of --profile')
    p.add_argument('--profile-top', type=int, default=12, help='operators listed per profile')
    p.add_argument('--quick', action='store_true',
                   help=f'CI smoke run: {QUICK_MODEL} (or the first model) at {QUICK_SIZE}, no '
                        'peers, 1 warm-up + 2 runs, with_cp off, fused attention')
    return p


def profile_markdown(profiles: Sequence[Dict[str, Any]], machine: Dict[str, Any],
                     matmul: Dict[str, Any]) -> str:
    """The report of ``--profile``: a summary row per profile, then each one's top operators
    and kinds of work."""
    lines = [f'# Training-step profile', '',
             f'{machine["device_name"]}, {machine["threads"]} thread(s), torch '
             f'{machine["torch"]}, {time.strftime("%Y-%m-%d")}; matmul '
             f'{matmul["gflops_per_s"]:.1f} GFLOP/s. One step (forward + backward, loss = mean '
             f'square of every output) after a warm-up step, `torch.profiler` self CPU time: '
             f'shares are of the step\'s total.', '',
             '| model | input | batch | step (ms) | forward (ms) | backward (ms) | backward / '
             'forward |', '|---|---|---|---|---|---|---|']
    for p in profiles:
        lines.append(f'| {profile_label(p)} | {p["size"]} | {p["batch"]} | {p["total_ms"]:.0f} | '
                     f'{p["forward_ms"]:.0f} | {p["backward_ms"]:.0f} | '
                     f'{p["backward_ms"] / p["forward_ms"]:.2f} |')
    for p in profiles:
        lines += ['', f'## {profile_label(p)}, {p["size"]}, batch {p["batch"]}', '',
                  '| operator | phase | self (ms) | share | calls | allocated (MB) |',
                  '|---|---|---|---|---|---|']
        lines += [f'| `{r["op"]}` | {r["phase"]} | {r["self_ms"]:.1f} | {r["share"]:.1%} | '
                  f'{r["calls"]} | {r["mem_mb"]:.0f} |' for r in p['top']]
        lines += ['', '| kind of work | phase | self (ms) | share |', '|---|---|---|---|']
        lines += [f'| {r["kind"]} | {r["phase"]} | {r["self_ms"]:.1f} | {r["share"]:.1%} |'
                  for r in p['kinds'] if r['share'] >= 0.01]
    return '\n'.join(lines) + '\n'


def profile_label(p: Dict[str, Any]) -> str:
    return p['model'] + ('' if p.get('kernels') in (None, 'mmhat') else
                         f' ({p["kernels"]} kernels)')


def run_profiles(models: Sequence[B.ModelSpec], args, machine, matmul) -> int:
    """``--profile``: each (model, train size, batch) profiled in this process, in turn."""
    profiles = []
    for hw in [B.parse_size(s) for s in list(args.train_sizes) + list(args.sizes)]:
        for m in models:
            for batch, kernels in itertools.product(
                    args.profile_batches,
                    kernel_sets(m, args.kernels) or [None]):
                if kernels == 'no-attn-replay':
                    continue  # profiles run without with_cp
                row = B.Row(model=m, size=hw, mode='train',
                            attn='fused' if m.switchable_attn else None,
                            layout='channels_last' if m.is_mmhat else None, kernels=kernels,
                            batch=batch, threads=args.threads, device=args.device,
                            warmup=args.warmup)
                print(f'profiling {row.describe()}', file=sys.stderr, flush=True)
                profiles.append(B.profile_train_step(row, top=args.profile_top))
                gc.collect()
    text = profile_markdown(profiles, machine, matmul)
    if args.out:
        args.out.write_text(text)
        json_path = args.json or args.out.with_suffix('.json')
        json_path.write_text(json.dumps(dict(machine=machine, matmul=matmul,
                                             profiles=profiles), indent=1, default=str))
        print(f'profile: {args.out}', file=sys.stderr)
    else:
        print(text)
    return 0


def batches_text(batch_size) -> str:
    """``--batch-size`` as the report states it (reports before it took several: an int)."""
    return ', '.join(map(str, batch_size)) if isinstance(batch_size, list) else str(batch_size)


def plot_title(machine: Dict[str, Any], batch_size) -> str:
    return (f'{machine["device_name"]}, {machine["threads"]} thread(s), torch '
            f'{machine["torch"]}, batch {batches_text(batch_size)}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replot:
        report = json.loads(args.replot.read_text())
        path = args.plot if isinstance(args.plot, Path) else args.replot.with_suffix('.png')
        results = [B.Result(**{k: v for k, v in r.items()
                               if k in {f.name for f in dataclasses.fields(B.Result)}})
                   for r in report['results']]
        B.plot_results(results, plot_title(report['machine'], report['settings']['batch_size']),
                       path, args.plot_all_paths)
        print(f'plot: {path}', file=sys.stderr)
        return 0
    if args.quick:
        args.models = args.models[:1] or [QUICK_MODEL]
        args.peers, args.infer_sizes, args.train_sizes, args.sizes = [], [QUICK_SIZE], [
            QUICK_SIZE], []
        args.warmup, args.runs, args.cp, args.matmul_size = 1, 2, 'off', 512
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit('--device cuda given, but this torch sees no CUDA device')
    if args.interleave == 'kernels' and args.kernels not in ('both', 'ablate'):
        raise SystemExit('--interleave times the kernel configurations of a model together: '
                         'give --kernels both or --kernels ablate (or --interleave models to '
                         'time the models together)')
    if args.processes < 1:
        raise SystemExit(f'--processes must be at least 1, got {args.processes}')
    if args.processes > 1 and not args.interleave:
        raise SystemExit('--processes times each group of --interleave rows in several '
                         'processes: give --interleave alone (or models, or kernels) too')
    args.warmup = max(1, args.warmup)
    peers = [] if args.peers in (['none'], []) else args.peers
    unknown = [p for p in peers if p.lower() not in B.PEERS]
    if unknown:
        raise SystemExit(f'unknown peers {unknown}; known: {", ".join(B.PEERS)}')
    if not args.models and not peers:
        raise SystemExit('give at least one model (e.g. mmhat.HATNet --arch tiny), a peer, '
                         'or --quick')
    try:
        models = [B.resolve_model(t, args.arch) for t in list(args.models) + [
            p for p in peers if p.lower() not in [m.lower() for m in args.models]]]
    except ValueError as e:
        raise SystemExit(str(e))
    keys = [m.key for m in models]
    ref = args.ref.lower() if args.ref else next((k for k in REF_PREFERENCE if k in keys), None)
    if ref is not None and ref not in keys:
        by_label = {m.label.lower(): m.key for m in models}
        if ref not in by_label:
            raise SystemExit(f'--ref {args.ref!r} is not among the measured models {keys}')
        ref = by_label[ref]
    if ref is not None and ref not in B.PEERS:
        raise SystemExit(f'--ref {args.ref!r} is not a peer: the "vs" columns compare with one '
                         f'of {", ".join(B.PEERS)} (give it in --peers); mmhat rows are '
                         'compared with each other in the ratio tables (--attn / --layout / '
                         '--kernels / --cp both)')
    ref_label = next((m.label for m in models if m.key == ref), None)
    if args.interleave in ('models', 'alone') and len(models) < 2 and args.kernels not in (
            'both', 'ablate') and args.cp != 'both':
        raise SystemExit(f'--interleave {args.interleave} times several models in turn: '
                         'give two or more (models or --peers), or --cp both to time one with and '
                         'without with_cp')

    torch.set_num_threads(args.threads)
    machine = B.machine_info(args.device, args.threads)
    print(f'device {args.device} ({machine["device_name"]}), torch {torch.__version__}, '
          f'{args.threads} thread(s) of {machine["cpu_count"]}, load average '
          f'{machine["load_average_start"]}', file=sys.stderr, flush=True)
    # The matmul runs here (the parent holds no model; threads are already set).
    matmul = B.matmul_rate(args.matmul_size, 5, args.device, args.threads)
    print(f'matmul {args.matmul_size}^3: {matmul["gflops_per_s"]:.1f} GFLOP/s',
          file=sys.stderr, flush=True)
    json_path = args.json or (args.out.with_suffix('.json') if args.out else None)
    for path in (args.out, json_path, args.plot):
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)

    def save_partial(done: List[B.Result]) -> None:
        # Long runs on a shared machine get interrupted; keep what was measured.
        if json_path:
            json_path.write_text(json.dumps(dict(partial=True, machine=machine, matmul=matmul,
                                                 results=list(map(B.result_to_dict, done))),
                                            indent=1, default=str))

    if args.profile:
        return run_profiles(models, args, machine, matmul)
    results = B.measure_rows(plan_rows(models, args), isolate=True, retries=args.retries,
                             busy_cores=args.busy_cores, retry_wait=args.retry_wait,
                             timeout=args.worker_timeout,
                             matmul_gflops_per_s=matmul['gflops_per_s'], on_row=save_partial,
                             interleave=args.interleave, processes=args.processes)
    # FLOPs are counted once per model and size: every row of it gets them
    flops = {(r.model_key, tuple(r.size)): r.gflops for r in results if r.gflops is not None}
    for r in results:
        r.gflops = flops.get((r.model_key, tuple(r.size)), r.gflops) if r.mode == 'infer' \
            else None
        if r.ok:
            B.add_rate(r, matmul['gflops_per_s'])
    foreign = [r.foreign_cores for r in results if r.foreign_cores is not None]
    share = [r.own_cpu_share for r in results if r.own_cpu_share is not None]
    machine.update(load_average_end=B.load_average(),
                   foreign_cores_median=statistics.median(foreign) if foreign else None,
                   foreign_cores_max=max(foreign) if foreign else None,
                   own_cpu_share_median=statistics.median(share) if share else None)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(ref=ref, ref_label=ref_label, min_runs=B.MIN_RUNS)
    ratios = summaries(results)
    vs_ref = peer_ratios(results, ref)
    report = dict(partial=False, machine=machine, settings=settings, matmul=matmul,
                  models=[dataclasses.asdict(m) for m in models],
                  results=[dict(B.result_to_dict(r),
                                vs_ref_speed=vs_ref[id(r)].speedup if id(r) in vs_ref else None,
                                vs_ref_speed_by_process=(vs_ref[id(r)].per_process_speedups()
                                                         if id(r) in vs_ref else []),
                                vs_ref_mem=vs_ref[id(r)].mem_ratio if id(r) in vs_ref else None)
                           for r in results],
                  summaries=pair_records(ratios))
    md = to_markdown(report, results, ratios, vs_ref)
    print(md)
    if args.out:
        args.out.write_text(md + '\n')
    if json_path:
        json_path.write_text(json.dumps(report, indent=1, default=str) + '\n')
    if args.plot is not None:
        path = (args.plot if isinstance(args.plot, Path) else
                args.out.with_suffix('.png') if args.out else Path('benchmark.png'))
        B.plot_results(results, plot_title(machine, args.batch_size), path, args.plot_all_paths)
        print(f'plot: {path}', file=sys.stderr)
    return 1 if any(not r.ok for r in results) else 0


if __name__ == '__main__':
    sys.exit(main())
