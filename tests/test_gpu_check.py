"""tools/gpu_check.py, the prepared GPU command, kept from rotting on the CPU: its quick plan
runs every section (correctness, SDPA kernels, ceiling, inference, training) and writes the
report, the raw JSON and the plot; and its budget shrinks the plan instead of overrunning."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tool_module
from mmhat.models.backbones import registered_families

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / 'tools' / 'gpu_check.py'
FAMILIES = registered_families()


def load_tool():
    return tool_module.load_tool('gpu_check')


@pytest.mark.slow
def test_quick_cpu_run_passes_every_section(tmp_path):
    out = tmp_path / 'gpu.md'
    env = dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE')
    proc = subprocess.run([sys.executable, str(TOOL), '--device', 'cpu', '--quick', '--out',
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert 'FAIL' not in proc.stdout, log[-4000:]
    for section in ('environment', 'correctness', 'sdpa', 'ceiling', 'inference', 'training'):
        assert f'-- {section}: ' in proc.stdout, section  # each section reports its wall time
    report = json.loads(out.with_suffix('.json').read_text())
    assert set(report['sections']) == {'environment', 'correctness', 'sdpa', 'ceiling',
                                       'inference', 'training'}
    families = {f'{cls.__name__}-{cls.smallest_arch}' for cls in FAMILIES}
    infer = {r['model'] for r in report['inference'] if r['error'] is None}
    assert families | {'Swin-T', 'PVTv2-B2', 'ResNet-50'} <= infer
    assert families <= {r['model'] for r in report['training'] if r['error'] is None}
    assert all(c['passed'] for c in report['checks'])
    checks = {c['name'] for c in report['checks']}
    for cls in FAMILIES:
        assert f'{cls.__name__} equals the official model, float64' in checks
        assert f'{cls.__name__} with_cp gradients == plain' in checks
    assert report['sdpa'] and {r['family'] for r in report['sdpa']} == {
        cls.__name__ for cls in FAMILIES if cls.fused_attention}
    assert len(report['nan_checks']) == len(FAMILIES)
    assert all(n['finite'] for n in report['nan_checks'])
    md = out.read_text()
    assert '## Checks' in md and '## SDPA kernels' in md and '## Training step' in md
    assert out.with_suffix('.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_plan_leaves_out_what_this_torch_cannot_run(monkeypatch):
    """torch 2.1 has no fp16 autocast on the CPU: the full CPU plan drops fp16 everywhere
    and says so in one line, instead of failing rows."""
    tool = load_tool()
    from mmhat import compat
    plan = tool.Plan.make(quick=False, device='cpu')
    assert 'fp16' in plan.precisions and 'fp16' in plan.train_precisions
    monkeypatch.setattr(compat, 'autocast_supports',
                        lambda device_type, dtype: dtype is not torch.float16)
    reduced, notes = plan.available('cpu')
    assert 'fp16' not in reduced.precisions + reduced.train_precisions + reduced.nan_precisions
    assert 'bf16' in reduced.precisions and reduced.sdpa_size == plan.sdpa_size
    assert notes == [f'fp16 autocast on cpu: not in torch {torch.__version__}']
    # fp16 autocast but no CPU GradScaler (torch 2.1-2.2): inference keeps fp16, training not
    monkeypatch.setattr(compat, 'autocast_supports', lambda device_type, dtype: True)
    monkeypatch.setattr(compat, 'TORCH_VERSION', (2, 1))
    reduced, notes = plan.available('cpu')
    assert 'fp16' in reduced.precisions and 'fp16' not in reduced.train_precisions
    assert len(notes) == 1 and 'needs torch >= 2.3' in notes[0]


def test_the_budget_skips_rows_instead_of_overrunning(monkeypatch):
    tool = load_tool()
    from mmhat.utils import benchmark as B
    report = tool.Report(device='cpu', budget_s=30.0)
    spec = B.resolve_model('mmhat.HATNet')
    rows = [B.Row(model=spec, size=(32, 32), phase='time', runs=1, warmup=1)
            for _ in range(3)]
    calls = []
    monkeypatch.setattr(B, 'measure', lambda row: calls.append(row) or B.Result.of(
        row, latency_s=0.01))
    # each measured row "costs" 10 s of a 30 s budget; a row needs its estimate (the last
    # row's time, 0.5 s at least) plus a 15 s reserve for the report
    monkeypatch.setattr(report, 'remaining', lambda: 30.0 - 10.0 * len(calls))
    results = tool.measure_plan(report, rows, estimate_s=1.0)
    assert len(results) == 2 and report.skipped == [rows[2].describe()]
