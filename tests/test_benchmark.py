"""tools/benchmark.py (a command line over mmhat.utils.benchmark): the --quick run writes the
promised outputs, rows are planned, paired and reported as documented.

No timing is asserted (these machines are shared; absolute times mean nothing here), only
that every number the report promises is there, finite and positive.
"""
import json
import math
import re
import sys
from pathlib import Path

import pytest

import tool_module
from mmhat.utils import benchmark as B

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / 'tools' / 'benchmark.py'


def load_tool():
    return tool_module.load_tool('benchmark')


def positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench') / 'results.md'
    rc = load_tool().main(['--quick', '--out', str(out), '--plot'])
    return rc, out


def test_quick_run_writes_markdown_json_and_plot(quick_run):
    rc, out = quick_run
    assert rc == 0
    for path in (out, out.with_suffix('.json'), out.with_suffix('.png')):
        assert path.is_file() and path.stat().st_size > 0, path
    assert out.with_suffix('.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_replot_redraws_a_saved_report(quick_run, tmp_path):
    _, out = quick_run
    png = tmp_path / 'again.png'
    assert load_tool().main(['--replot', str(out.with_suffix('.json')), '--plot', str(png),
                             '--plot-all-paths']) == 0
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_markdown_has_machine_and_one_row_per_mode(quick_run):
    _, out = quick_run
    md = out.read_text()
    assert re.search(r'threads 1 of \d+ cores', md)
    assert 'machine load' in md and 'matmul' in md
    rows = [ln for ln in md.splitlines() if ln.startswith('| ShuntedTransformer-tiny |')]
    assert len(rows) == 2  # one inference row, one training row
    infer, train = (ln.strip('|').split('|') for ln in rows)
    assert len(infer) == 11 and len(train) == 9  # the header widths of the two tables
    for cells in (infer, train):
        assert cells[1].strip() == '128x128' and cells[2].strip() == 'fused'
        assert 'error' not in '|'.join(cells)


def test_json_has_every_raw_number(quick_run):
    _, out = quick_run
    report = json.loads(out.with_suffix('.json').read_text())
    assert set(report) >= {'machine', 'settings', 'matmul', 'models', 'results', 'summaries'}
    machine = report['machine']
    assert machine['threads'] == 1 and machine['device'] == 'cpu' and machine['torch']
    assert machine['load_average_start'] is not None
    assert positive(report['matmul']['gflops_per_s'])
    results = report['results']
    assert [r['mode'] for r in results] == ['infer', 'train']
    for r in results:
        assert r['size'] == [128, 128] and r['with_cp'] is False and r['attn'] == 'fused'
        assert len(r['latency_all_s']) == 2  # --quick: 1 warm-up (not kept) + 2 runs
        for key in ('latency_s', 'throughput', 'peak_mem_mb', 'params_m'):
            assert positive(r[key]), (key, r[key])
        assert all(positive(t) for t in r['latency_all_s'])
        assert r['foreign_cores'] is None or r['foreign_cores'] >= 0
        assert positive(r['own_cpu_share'])
        # CPU memory comes from a second process of its own, not from the timed one.
        assert r['phase'] == 'time'
        if sys.platform == 'linux':
            assert r['mem_method'].endswith('blocks >= 128 KiB mmapped'), r['mem_method']
    infer = results[0]
    for key in ('gflops', 'achieved_gflops_per_s', 'matmul_fraction'):
        assert positive(infer[key]), (key, infer[key])


def test_size_parsing_and_model_resolution():
    assert B.parse_size('224') == (224, 224)
    assert B.parse_size('800x1333') == (800, 1333)  # height first
    with pytest.raises(Exception):
        B.parse_size('800x')
    shunted = B.resolve_model('mmhat.ShuntedTransformer:small')
    assert shunted.label == 'ShuntedTransformer-small' and shunted.switchable_attn
    gmf = B.resolve_model('mmhat.GroupMixFormer')  # the family's smallest_arch by default
    assert gmf.arch == 'mini' and not gmf.switchable_attn and gmf.supports_cp
    # TransCNN's attention is HAT-Net's module: it has both paths too.
    assert B.resolve_model('mmhat.TransCNN').switchable_attn
    pvt = B.resolve_model('pvtv2-b2')  # mmdet's PVTv2 has no with_cp
    assert pvt.label == 'PVTv2-B2' and not pvt.supports_cp and not pvt.switchable_attn
    assert B.resolve_model('r50').supports_cp and B.resolve_model('r50').source == 'mmdet'
    cfg = B.resolve_model(str(ROOT / 'configs/det/maskrcnn_shunted_s_coco.py'))
    assert cfg.label == 'maskrcnn_shunted_s_coco' and cfg.arch == 'small'
    assert cfg.type == 'mmhat.ShuntedTransformer' and cfg.switchable_attn
    assert 'init_cfg' not in cfg.cfg and cfg.cfg['norm_cfg']['type'] == 'BN'
    assert cfg.cfg['drop_path_rate'] == 0.1
    with pytest.raises(ValueError, match='not found'):
        B.resolve_model('configs/det/no_such_config.py')
    with pytest.raises(ValueError, match="unknown arch 'huge'"):
        B.resolve_model('mmhat.HATNet:huge')


def result(spec, **kw):
    row = B.Row(model=spec, size=(64, 96), **{k: v for k, v in kw.items()
                                               if k in ('mode', 'attn', 'layout', 'compile',
                                                        'with_cp', 'kernels', 'batch')})
    return B.Result.of(row, **{k: v for k, v in kw.items()
                               if k in ('latency_s', 'peak_mem_mb', 'compile_s')})


def test_compile_rows_are_planned_paired_and_reported():
    """--compile both: every row twice, each compiled row paired with its eager twin; a
    CPU compiled row has no memory figure (the compiler's heap hides it), and the report
    says so instead of dividing by it."""
    tool = load_tool()
    args = tool.build_parser().parse_args(
        ['mmhat.GroupMixFormer', '--peers', 'none', '--modes', 'infer', '--infer-sizes',
         '64x96', '--compile', 'both'])
    model = B.resolve_model('mmhat.GroupMixFormer')
    rows = tool.plan_rows([model], args)
    assert [r.compile for r in rows] == [False, True]
    assert [r.flops for r in rows] == [True, False]  # FLOPs counted once per size
    results = [result(model, compile=False, latency_s=0.4, peak_mem_mb=30.0, layout='channels_last'),
               result(model, compile=True, latency_s=0.25, peak_mem_mb=None, compile_s=70.0,
                      layout='channels_last')]
    s = tool.summaries(results)
    (c,) = s['compiled_vs_eager']
    assert c.speedup == pytest.approx(1.6) and c.mem_ratio is None
    report = dict(machine=dict(device='cpu', device_name='x', torch='t', mmdet='m', threads=1,
                               cpu_count=2, omp_wait_policy='PASSIVE', load_average_start=None,
                               load_average_end=None, foreign_cores_median=None,
                               foreign_cores_max=None, own_cpu_share_median=None),
                  matmul=dict(n=8, latency_s=1.0, gflops_per_s=1.0),
                  settings=dict(ref_label=None, batch_size=1, runs=3, warmup=1))
    md = tool.to_markdown(report, results, s, {})
    assert '## torch.compile (inductor) vs eager' in md
    assert re.search(r'\| GroupMixFormer-mini \| 64x96 \| — \+ compile \| 250\.0 \|', md)
    assert re.search(r'\| infer \| — \| off \| 1\.60 \| — \| 70 \|', md)


def test_reference_rows_are_planned_for_mmhat_models_and_reported():
    """--layout both --attn both: our backbones get NCHW twins (peers do not), and each
    fast row (fused, channels-last) is set against its reference (explicit, NCHW)."""
    tool = load_tool()
    args = tool.build_parser().parse_args(
        ['mmhat.HATNet', '--peers', 'r50', '--modes', 'infer', '--infer-sizes', '64',
         '--attn', 'both', '--layout', 'both'])
    hat, r50 = B.resolve_model('mmhat.HATNet'), B.resolve_model('r50')
    rows = tool.plan_rows([hat, r50], args)
    assert [(r.attn, r.layout) for r in rows if r.model is hat] == [
        ('fused', 'channels_last'), ('fused', 'nchw'), ('explicit', 'channels_last'),
        ('explicit', 'nchw')]
    assert [(r.attn, r.layout) for r in rows if r.model is r50] == [(None, None)]
    results = [result(hat, attn=a, layout=lay, latency_s=t, peak_mem_mb=10.0)
               for a, lay, t in [('fused', 'channels_last', 0.5), ('fused', 'nchw', 0.6),
                                 ('explicit', 'channels_last', 0.6), ('explicit', 'nchw', 0.8)]]
    s = tool.summaries(results)
    (ref,) = s['vs_reference']
    assert ref.speedup == pytest.approx(1.6) and ref.reference.path() == 'explicit, NCHW'
    # fused/explicit pairs stay within one layout
    assert sorted(round(p.speedup, 2) for p in s['fused_vs_explicit']) == [1.2, 1.33]


def test_kernel_rows_and_batches_are_planned_paired_and_reported():
    """--kernels both --batch-size 1 2: families with training kernels (conv kernels, fused
    attention or kept products, which with_cp replays) get a plain twin per batch (peers do
    not), each paired with its twin of the same batch; the report has the kernels/plain
    table and a batch column."""
    tool = load_tool()
    args = tool.build_parser().parse_args(
        ['mmhat.HATNet', 'mmhat.GroupMixFormer', '--peers', 'r50', '--modes', 'train',
         '--train-sizes', '64', '--kernels', 'both', '--cp', 'off', '--batch-size', '1', '2'])
    hat, gmf, r50 = (B.resolve_model(k) for k in ('mmhat.HATNet', 'mmhat.GroupMixFormer',
                                                    'r50'))
    rows = tool.plan_rows([hat, gmf, r50], args)
    assert [(r.batch, r.kernels) for r in rows if r.model is hat] == [
        (1, 'mmhat'), (1, 'plain'), (2, 'mmhat'), (2, 'plain')]
    assert [(r.batch, r.kernels) for r in rows if r.model is gmf] == [
        (1, 'mmhat'), (1, 'plain'), (2, 'mmhat'), (2, 'plain')]
    assert B.resolve_model('mmhat.ShuntedTransformer').kernel_features == ('attn-replay',)
    assert gmf.kernel_features == ('conv', 'attn-replay')
    assert hat.kernel_features == ('conv', 'act-recompute', 'window-copies', 'attn-replay')
    assert B.resolve_model('mmhat.TransCNN').kernel_features == (
        'conv', 'act-recompute', 'window-copies', 'norm-fold', 'attn-replay')
    assert [(r.batch, r.kernels) for r in rows if r.model is r50] == [(1, None), (2, None)]
    results = [result(hat, mode='train', attn='fused', layout='channels_last', kernels=k,
                      batch=b, latency_s=t, peak_mem_mb=m)
               for b, k, t, m in [(1, 'mmhat', 0.8, 10.0), (1, 'plain', 1.0, 10.0),
                                  (2, 'mmhat', 1.5, 20.0), (2, 'plain', 2.1, 22.0)]]
    results.append(result(r50, mode='train', batch=1, latency_s=1.2, peak_mem_mb=8.0))
    s = tool.summaries(results)
    assert [(p.result.batch, round(p.speedup, 2), round(p.mem_ratio, 2))
            for p in s['kernels_vs_plain']] == [(1, 1.25, 1.0), (2, 1.4, 0.91)]
    vs = tool.peer_ratios(results, 'r50')
    assert vs[id(results[0])].speedup == pytest.approx(1.5)  # both kernel sets meet the peer
    assert vs[id(results[1])].speedup == pytest.approx(1.2)
    assert id(results[2]) not in vs  # no peer row at batch 2
    report = dict(machine=dict(device='cpu', device_name='x', torch='t', mmdet='m', threads=1,
                               cpu_count=2, omp_wait_policy='PASSIVE', load_average_start=None,
                               load_average_end=None, foreign_cores_median=None,
                               foreign_cores_max=None, own_cpu_share_median=None),
                  matmul=dict(n=8, latency_s=1.0, gflops_per_s=1.0),
                  settings=dict(ref_label=None, batch_size=[1, 2], runs=3, warmup=1))
    md = tool.to_markdown(report, results, s, {})
    assert '- batch 1, 2;' in md
    assert "## mmhat's training kernels vs plain (nn.Conv2d, with_cp recomputing" in md
    assert '| HATNet-tiny | 64x96 | 2 | fused, plain kernels | off | 2100.0 |' in md
    assert '| HATNet-tiny | 64x96 | train | off | 2 | fused | 1.40 | 0.91 |' in md
    assert '--interleave' not in md
    for r in results[:4]:
        r.interleaved = True
    assert 'alternating the configurations step by step (`--interleave`)' in \
        tool.to_markdown(report, results, s, {})
    report['settings']['interleave'] = 'models'
    assert 'with_cp on and off taking turns step by step (`--interleave models`)' in \
        tool.to_markdown(report, results, s, {})
    # with_cp against plain, per batch
    cp = [result(hat, mode='train', attn='fused', layout='channels_last', kernels='mmhat',
                 with_cp=True, batch=b, latency_s=t, peak_mem_mb=4.0)
          for b, t in ((1, 1.0), (2, 1.8))]
    s = tool.summaries(results + cp)
    md = tool.to_markdown(report, results + cp, s, {})
    assert '| model | input | batch | path | peak mem plain (MB) |' in md
    assert '| HATNet-tiny | 64x96 | 2 | fused | 20 | 4 | 0.20 | 1.20 |' in md


def test_kernel_ablation_rows_switch_one_feature_off_each():
    """--kernels ablate: per family, mmhat's kernels, plain, and all-but-one of each feature
    it has (the attention replay only with with_cp); each paired with the all-on row."""
    tool = load_tool()
    args = tool.build_parser().parse_args(
        ['mmhat.HATNet', 'mmhat.ShuntedTransformer', '--peers', 'none', '--modes', 'train',
         '--train-sizes', '64', '--kernels', 'ablate', '--cp', 'both'])
    hat, sht = B.resolve_model('mmhat.HATNet'), B.resolve_model('mmhat.ShuntedTransformer')
    rows = tool.plan_rows([hat, sht], args)
    assert [(r.with_cp, r.kernels) for r in rows if r.model is hat] == [
        (False, 'mmhat'), (True, 'mmhat'), (False, 'plain'), (True, 'plain'),
        (False, 'no-conv'), (True, 'no-conv'), (False, 'no-act-recompute'),
        (True, 'no-act-recompute'), (False, 'no-window-copies'), (True, 'no-window-copies'),
        (True, 'no-attn-replay')]
    assert [(r.with_cp, r.kernels) for r in rows if r.model is sht] == [
        (False, 'mmhat'), (True, 'mmhat'), (False, 'plain'), (True, 'plain'),
        (True, 'no-attn-replay')]
    results = [result(hat, mode='train', with_cp=cp, kernels=k, latency_s=t, peak_mem_mb=m)
               for cp, k, t, m in [(False, 'mmhat', 1.0, 10.0), (False, 'no-conv', 1.1, 10.0),
                                   (False, 'no-act-recompute', 0.96, 14.0),
                                   (True, 'mmhat', 1.1, 4.0), (True, 'no-attn-replay', 1.3, 3.6)]]
    ablation = tool.summaries(results)['kernel_ablation']
    assert [(p.reference.kernels, p.result.with_cp, round(p.speedup, 2), round(p.mem_ratio, 2))
            for p in ablation] == [('no-conv', False, 1.1, 1.0),
                                   ('no-act-recompute', False, 0.96, 0.71),
                                   ('no-attn-replay', True, 1.18, 1.11)]


def test_train_kernels_switch_each_feature():
    from mmhat.models import layers as L
    uses = (L.use_cpu_kernels, L.use_act_recompute, L.use_window_copies, L.use_norm_fold,
            L.use_attention_replay)
    for kernels, want in [('mmhat', (True, True, True, True, True)),
                          ('plain', (False, False, False, False, False)),
                          ('no-conv', (False, True, True, True, True)),
                          ('no-act-recompute', (True, False, True, True, True)),
                          ('no-window-copies', (True, True, False, True, True)),
                          ('no-norm-fold', (True, True, True, False, True)),
                          ('no-attn-replay', (True, True, True, True, False))]:
        with B.train_kernels(kernels):
            assert tuple(u() for u in uses) == want, kernels
        assert all(u() for u in uses)
    with pytest.raises(ValueError, match='unknown kernels .no-such.'):
        with B.train_kernels('no-such'):
            pass
    assert all(u() for u in uses)


def test_row_paths_set_and_restore_the_process_defaults():
    from mmhat.models.layers import use_attention_replay, use_cpu_kernels, use_fused_attn
    row = B.Row(model=B.resolve_model('mmhat.HATNet'), size=(64, 64), attn='explicit',
                kernels='plain')
    assert use_cpu_kernels() and use_fused_attn() and use_attention_replay()
    with B.row_paths(row):
        assert not use_cpu_kernels() and not use_fused_attn() and not use_attention_replay()
    assert use_cpu_kernels() and use_fused_attn() and use_attention_replay()
    assert 'explicit plain kernels' in row.describe()


def test_peer_ratios_pair_every_row_with_the_reference_peer():
    tool = load_tool()
    hat, r50 = B.resolve_model('mmhat.HATNet'), B.resolve_model('r50')
    results = [result(hat, attn='fused', layout='channels_last', latency_s=0.5, peak_mem_mb=20.0),
               result(r50, latency_s=1.0, peak_mem_mb=10.0)]
    ratios = tool.peer_ratios(results, 'r50')
    assert ratios[id(results[0])].speedup == pytest.approx(2.0)
    assert ratios[id(results[0])].mem_ratio == pytest.approx(2.0)
    assert ratios[id(results[1])].speedup == pytest.approx(1.0)  # the peer against itself


def test_profile_splits_the_training_step_into_forward_and_backward(tmp_path):
    """``--profile``: one profiled training step per (model, size, batch); the per-operator
    self times add up to the step, split by phase, and the report names them."""
    out = tmp_path / 'profile.md'
    rc = load_tool().main(['mmhat.ShuntedTransformer:tiny', '--peers', 'none', '--profile',
                           '--train-sizes', '64', '--profile-batches', '1', '2',
                           '--profile-top', '5', '--matmul-size', '256', '--out', str(out)])
    assert rc == 0
    report = json.loads(out.with_suffix('.json').read_text())
    assert [p['batch'] for p in report['profiles']] == [1, 2]
    for p in report['profiles']:
        assert p['size'] == '64x64' and p['forward_ms'] > 0 and p['backward_ms'] > 0
        assert math.isclose(p['forward_ms'] + p['backward_ms'], p['total_ms'], rel_tol=1e-9)
        assert len(p['top']) == 5
        assert [r['self_ms'] for r in p['top']] == sorted((r['self_ms'] for r in p['top']),
                                                          reverse=True)
        assert {r['phase'] for r in p['top']} <= {'forward', 'backward'}
        # every op lands in one kind and one phase: the kinds add up to the step
        assert math.isclose(sum(k['self_ms'] for k in p['kinds']), p['total_ms'], rel_tol=1e-6)
        assert any(r['phase'] == 'backward' for r in p['top'])
    text = out.read_text()
    assert '| ShuntedTransformer-tiny | 64x64 | 2 |' in text and 'backward / forward' in text


def test_op_kinds():
    assert B.op_kind('aten::_scaled_dot_product_flash_attention_for_cpu_backward') == 'attention'
    assert B.op_kind('aten::_slow_conv2d_backward') == 'convolution'
    assert B.op_kind('aten::native_batch_norm_backward') == 'normalisation'
    assert B.op_kind('aten::addmm') == 'matmul / linear'
    assert B.op_kind('aten::copy_') == 'layout copies'
    assert B.op_kind('aten::gelu_backward') == 'element-wise'
    assert B.op_kind('aten::something_new') == 'other'


def test_measure_interleaved_alternates_the_kernel_configurations(monkeypatch, tmp_path):
    """--interleave: one model, its kernel configurations taking turns step by step (run i
    starts at configuration i), each row with its own runs; the worker takes a list of rows
    the same way."""
    from mmhat.models import layers as L
    hat = B.resolve_model('mmhat.HATNet')
    rows = [B.Row(model=hat, size=(64, 64), mode='train', attn='fused',
                  layout='channels_last', kernels=k, runs=3, warmup=1)
            for k in ('mmhat', 'plain', 'no-conv')]
    seen, time_once = [], B.time_once

    def recording(fn, device):
        seen.append((L.use_cpu_kernels(), L.use_act_recompute()))
        return time_once(fn, device)
    monkeypatch.setattr(B, 'time_once', recording)
    results = B.measure_interleaved(rows)
    mmhat, plain, no_conv = (True, True), (False, False), (False, True)
    assert seen == [mmhat, plain, no_conv, plain, no_conv, mmhat, no_conv, mmhat, plain]
    assert [r.kernels for r in results] == ['mmhat', 'plain', 'no-conv']
    assert all(r.interleaved and r.ok and len(r.latency_all_s) == 3 for r in results)
    assert all(r.throughput == pytest.approx(1 / r.latency_s) for r in results)
    assert L.use_cpu_kernels() and L.use_act_recompute()  # restored
    with pytest.raises(ValueError, match='differ in their kernels only'):
        B.measure_interleaved([rows[0], B.dataclasses.replace(rows[1], batch=2)])

    monkeypatch.setattr(B, 'time_once', time_once)
    out = tmp_path / 'results.json'
    one_run = [B.dataclasses.replace(r, runs=1, warmup=0, flops=True) for r in rows[:2]]
    assert B._worker(json.dumps([json.loads(B._row_to_json(r)) for r in one_run]), str(out)) == 0
    got = [B.Result(**d) for d in json.loads(out.read_text())]
    assert [(r.kernels, r.interleaved, len(r.latency_all_s)) for r in got] == [
        ('mmhat', True, 1), ('plain', True, 1)]
    assert got[0].gflops == got[1].gflops and positive(got[0].gflops)


def test_measure_rows_interleaves_only_kernel_twins(monkeypatch):
    """Rows equal but for their kernels are timed in one worker; every row's memory and the
    rows without a twin (peers) still get their own processes; the order of the results is
    the order of the rows."""
    hat, r50 = B.resolve_model('mmhat.HATNet'), B.resolve_model('r50')
    rows = [B.Row(model=hat, size=(64, 64), mode='train', kernels=k) for k in ('mmhat', 'plain')]
    rows.append(B.Row(model=r50, size=(64, 64), mode='train'))
    calls = []

    def spawn(row, timeout):
        calls.append((row.model.key, row.kernels, row.phase))
        return B.Result.of(row, latency_s=1.0, peak_mem_mb=5.0, mem_method='VmHWM')

    def spawn_interleaved(group, timeout):
        calls.append(('interleaved', tuple(r.kernels for r in group), group[0].phase))
        return [B.Result.of(r, latency_s=0.5 + i, interleaved=True) for i, r in enumerate(group)]
    monkeypatch.setattr(B, 'spawn', spawn)
    monkeypatch.setattr(B, 'spawn_interleaved', spawn_interleaved)
    results = B.measure_rows(rows, interleave=True, log=lambda s: None)
    assert calls == [('interleaved', ('mmhat', 'plain'), 'time'),
                     (hat.key, 'mmhat', 'memory'), (hat.key, 'plain', 'memory'),
                     (r50.key, None, 'time'), (r50.key, None, 'memory')]
    assert [(r.kernels, r.latency_s, r.peak_mem_mb, r.interleaved) for r in results] == [
        ('mmhat', 0.5, 5.0, True), ('plain', 1.5, 5.0, True), (None, 1.0, 5.0, False)]


def test_interleave_without_kernel_configurations_is_refused():
    with pytest.raises(SystemExit, match='give --kernels both or --kernels ablate'):
        load_tool().main(['mmhat.HATNet', '--peers', 'none', '--interleave'])


def test_measure_interleaved_across_models(monkeypatch):
    """--interleave models: rows of several models (and a model's kernel configurations) at
    one size, mode and batch take turns step by step in one process; rows of one model share
    it; each row reports its own model's parameters and FLOPs."""
    from mmhat.models import layers as L
    hat, r50 = B.resolve_model('mmhat.HATNet'), B.resolve_model('r50')
    rows = [B.Row(model=hat, size=(64, 64), mode='train', attn='fused', layout='channels_last',
                  kernels=k, runs=3, warmup=1, flops=True) for k in ('mmhat', 'plain')]
    rows.append(B.Row(model=r50, size=(64, 64), mode='train', runs=3, warmup=1, flops=True))
    seen, time_once = [], B.time_once
    with_cp = B.Row(model=hat, size=(64, 64), mode='train', attn='fused',
                    layout='channels_last', kernels='mmhat', with_cp=True, runs=3, warmup=1)

    def recording(fn, device):
        seen.append((fn, L.use_cpu_kernels()))
        return time_once(fn, device)
    monkeypatch.setattr(B, 'time_once', recording)
    built = []
    prepare = B.prepare
    monkeypatch.setattr(B, 'prepare', lambda row: built.append(row.model.key) or prepare(row))
    with pytest.raises(ValueError, match='differ in their kernels only'):
        B.measure_interleaved(rows)  # across kernels only: R50 is another model
    built.clear()
    results = B.measure_interleaved(rows, across='models')
    assert built == [hat.key, r50.key]  # HAT-Net's two rows share one model
    order = list(dict.fromkeys(fn for fn, _ in seen))
    assert len(order) == 3
    assert [order.index(fn) for fn, _ in seen] == [0, 1, 2, 1, 2, 0, 2, 0, 1]
    # HAT-Net's rows switch the kernels; R50 runs with the kernels as they were (on)
    assert [k for fn, k in seen[:3]] == [True, False, True]
    assert [r.model_key for r in results] == [hat.key, hat.key, r50.key]
    assert all(r.interleaved and r.ok and len(r.latency_all_s) == 3 for r in results)
    assert results[0].params_m == results[1].params_m != results[2].params_m
    assert results[0].gflops == results[1].gflops != results[2].gflops
    assert all(positive(r.gflops) for r in results)
    # with_cp on and off take turns too; with_cp is set when a model is built: its own model
    built.clear()
    seen.clear()
    cp_results = B.measure_interleaved([rows[0], with_cp], across='models')
    assert built == [hat.key, hat.key]
    assert len(set(fn for fn, _ in seen)) == 2 and len(seen) == 6
    assert [r.with_cp for r in cp_results] == [False, True]
    with pytest.raises(ValueError, match='differ in their kernels only'):
        B.measure_interleaved([rows[0], with_cp])
    with pytest.raises(ValueError, match='differ in their model / attn / layout / kernels / with_cp'):
        B.measure_interleaved([rows[0], B.dataclasses.replace(rows[2], batch=2)],
                              across='models')
    with pytest.raises(ValueError, match='differ from each other'):
        B.measure_interleaved([rows[0], rows[0]], across='models')
    with pytest.raises(ValueError, match='unknown interleave mode'):
        B.interleave_key(rows[0], 'sizes')


def test_measure_rows_interleaves_models(monkeypatch):
    """With interleave='models' the rows of one size, mode and batch go to one worker
    whatever their model and with_cp; other batches form their own groups; memory stays per
    row."""
    hat, r50 = B.resolve_model('mmhat.HATNet'), B.resolve_model('r50')
    rows = [B.Row(model=m, size=(64, 64), mode='train', batch=b)
            for b in (1, 2) for m in (hat, r50)]
    rows.append(B.Row(model=hat, size=(64, 64), mode='train', with_cp=True))
    calls = []

    def spawn(row, timeout):
        calls.append((row.model.key, row.batch, row.with_cp, row.phase))
        return B.Result.of(row, latency_s=1.0, peak_mem_mb=5.0, mem_method='VmHWM')

    def spawn_interleaved(group, timeout):
        calls.append(('interleaved', tuple((r.model.key, r.batch, r.with_cp) for r in group)))
        return [B.Result.of(r, latency_s=0.5 + i, interleaved=True) for i, r in enumerate(group)]
    monkeypatch.setattr(B, 'spawn', spawn)
    monkeypatch.setattr(B, 'spawn_interleaved', spawn_interleaved)
    results = B.measure_rows(rows, interleave='models', log=lambda s: None)
    assert calls == [('interleaved', ((hat.key, 1, False), (r50.key, 1, False),
                                      (hat.key, 1, True))),
                     (hat.key, 1, False, 'memory'), (r50.key, 1, False, 'memory'),
                     ('interleaved', ((hat.key, 2, False), (r50.key, 2, False))),
                     (hat.key, 2, False, 'memory'), (r50.key, 2, False, 'memory'),
                     (hat.key, 1, True, 'memory')]
    assert [(r.latency_s, r.interleaved) for r in results] == [
        (0.5, True), (1.5, True), (0.5, True), (1.5, True), (2.5, True)]


def test_interleave_models_needs_two_models():
    with pytest.raises(SystemExit, match='give two or more .*or --cp both'):
        load_tool().main(['mmhat.HATNet', '--peers', 'none', '--interleave', 'models',
                          '--cp', 'off'])
    with pytest.raises(SystemExit, match='or --interleave models'):
        load_tool().main(['mmhat.HATNet', '--peers', 'none', '--interleave', 'kernels'])


def test_measure_rows_times_each_group_in_several_processes(monkeypatch):
    """processes=3: each interleaved group runs in three workers one after the other; a row's
    latency is the median of its per-process medians, every step is kept, and a ratio is the
    median of the per-process ratios (not the ratio of the medians); a row that failed in
    any process is reported as failed."""
    hat, r50 = B.resolve_model('mmhat.HATNet'), B.resolve_model('r50')
    rows = [B.Row(model=m, size=(64, 64), mode='train') for m in (hat, r50)]
    # per process: (HAT-Net, ResNet-50) latencies; ratios r50 / hat 2.0, 1.1, 1.5
    per_process = iter([(1.0, 2.0), (2.0, 2.2), (1.2, 1.8)])
    calls = []

    def spawn(row, timeout):
        calls.append((row.model.key, row.phase))
        return B.Result.of(row, latency_s=9.0, peak_mem_mb=5.0, mem_method='VmHWM')

    def spawn_interleaved(group, timeout):
        calls.append('interleaved')
        times = next(per_process)
        return [B.Result.of(r, latency_s=t, latency_all_s=[t, t], foreign_cores=0.1 * t,
                            interleaved=True) for r, t in zip(group, times)]
    monkeypatch.setattr(B, 'spawn', spawn)
    monkeypatch.setattr(B, 'spawn_interleaved', spawn_interleaved)
    got = B.measure_rows(rows, interleave='models', processes=3, log=lambda s: None)
    assert calls == ['interleaved'] * 3 + [(hat.key, 'memory'), (r50.key, 'memory')]
    h, r = got
    assert h.latency_by_process_s == [1.0, 2.0, 1.2] and h.latency_s == 1.2
    assert r.latency_by_process_s == [2.0, 2.2, 1.8] and r.latency_s == 2.0
    assert h.latency_all_s == [1.0, 1.0, 2.0, 2.0, 1.2, 1.2] and h.throughput == 1 / 1.2
    assert h.foreign_cores == pytest.approx(0.2) and h.peak_mem_mb == 5.0
    pair = B.Pair(h, r)
    assert pair.per_process_speedups() == pytest.approx([2.0, 1.1, 1.5])
    assert pair.speedup == pytest.approx(1.5)  # the ratio of the medians would be 1.67
    assert pair.time_ratio == pytest.approx(1 / 1.5)
    assert B.Pair(h, B.Result.of(rows[1], latency_s=2.0)).speedup == pytest.approx(2.0 / 1.2)
    tool = load_tool()
    assert tool.per_process_text(pair) == '1.10-2.00' and tool.per_process_text(None) == '—'

    failed = B.merge_processes([[B.Result.of(rows[0], latency_s=1.0)],
                                [B.Result.of(rows[0], error='worker exited with -9')]])
    assert failed[0].error == 'worker exited with -9' and not failed[0].ok
    unmeasured = B.merge_processes([[B.Result.of(rows[0], latency_s=1.0)]] * 2)
    assert unmeasured[0].own_cpu_share is None and unmeasured[0].latency_s == 1.0
    with pytest.raises(ValueError, match='at least 1'):
        B.measure_rows(rows, interleave='models', processes=0)


def test_measure_rows_alone_takes_turns_in_fresh_processes(monkeypatch):
    """interleave='alone': the groups of 'models', but each row timed alone in a fresh
    process, the rows taking turns (HAT-Net, R50, HAT-Net, R50, ...), one turn per process
    count; no worker holds two rows; memory once per row after the turns; a ratio is the
    median of the per-turn ratios."""
    hat, r50 = B.resolve_model('mmhat.HATNet'), B.resolve_model('r50')
    rows = [B.Row(model=m, size=(64, 64), mode='train', batch=b)
            for b in (1, 2) for m in (hat, r50)]
    # (model, batch) -> latencies of its turns; ratios r50 / hat at batch 1: 2.0, 1.1, 1.5
    times = {(hat.key, 1): iter([1.0, 2.0, 1.2]), (r50.key, 1): iter([2.0, 2.2, 1.8]),
             (hat.key, 2): iter([3.0] * 3), (r50.key, 2): iter([6.0] * 3)}
    calls = []

    def spawn(row, timeout):
        calls.append((row.model.key, row.batch, row.phase))
        if row.phase == 'memory':
            return B.Result.of(row, peak_mem_mb=5.0, mem_method='VmHWM')
        return B.Result.of(row, latency_s=next(times[row.model.key, row.batch]))

    def spawn_interleaved(group, timeout):
        raise AssertionError('no worker may time two rows')
    monkeypatch.setattr(B, 'spawn', spawn)
    monkeypatch.setattr(B, 'spawn_interleaved', spawn_interleaved)
    got = B.measure_rows(rows, interleave='alone', processes=3, log=lambda s: None)
    turns = [(hat.key, 1, 'time'), (r50.key, 1, 'time')] * 3
    assert calls == turns + [(hat.key, 1, 'memory'), (r50.key, 1, 'memory')] + [
        (m.key, 2, phase) for m, phase in [(hat, 'time'), (r50, 'time')] * 3
        + [(hat, 'memory'), (r50, 'memory')]]
    h, r = got[:2]
    assert h.latency_by_process_s == [1.0, 2.0, 1.2] and h.latency_s == 1.2
    assert r.latency_by_process_s == [2.0, 2.2, 1.8] and h.peak_mem_mb == 5.0
    assert not h.interleaved and B.Pair(h, r).speedup == pytest.approx(1.5)
    assert B.Pair(got[2], got[3]).speedup == pytest.approx(2.0)
    with pytest.raises(ValueError, match='unknown interleave mode'):
        B.measure_rows(rows, interleave='sizes')


def test_alone_report_and_arguments(tmp_path):
    """The report says how an 'alone' run timed its rows; one model alone is refused."""
    tool = load_tool()
    assert "`--interleave alone`" in tool.INTERLEAVED['alone']
    with pytest.raises(SystemExit, match='--interleave alone times several models in turn'):
        tool.main(['mmhat.HATNet', '--peers', 'none', '--interleave', 'alone', '--cp', 'off'])


def test_ref_must_be_a_measured_peer():
    """The "vs" columns pair rows with a peer's (no attention path, layout or kernels); an
    mmhat model as --ref would give empty columns, so it is refused, as is an unmeasured
    one."""
    with pytest.raises(SystemExit, match="'HATNet-tiny' is not a peer.*swin-t"):
        load_tool().main(['mmhat.HATNet:tiny', 'mmhat.TransCNN:tiny', '--peers', 'none',
                          '--ref', 'HATNet-tiny'])
    with pytest.raises(SystemExit, match='not among the measured models'):
        load_tool().main(['mmhat.HATNet:tiny', '--peers', 'r50', '--ref', 'swin-t'])


def test_processes_needs_interleave():
    with pytest.raises(SystemExit, match='give --interleave alone'):
        load_tool().main(['mmhat.HATNet', '--peers', 'r50', '--processes', '3'])
    with pytest.raises(SystemExit, match='at least 1'):
        load_tool().main(['mmhat.HATNet', '--peers', 'r50', '--processes', '0'])
