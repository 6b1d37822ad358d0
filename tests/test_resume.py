"""Interrupted training loses nothing, proven by killing it.

For the toy Mask R-CNN and the toy Semantic FPN: ``tools/train.py`` is SIGKILLed during epoch
3, after its first logged iteration; ``--resume`` then continues from ``epoch_2.pth`` and must
log exactly (``==``, every float bit) the losses, accuracies and learning rates that an
uninterrupted run logs for epoch 3. That holds only because ``mmhat.EpochSeedHook`` re-seeds
every RNG per epoch: without it the resumed epoch draws different flips, RPN/RoI samples and
dropout masks than the uninterrupted one.

Before resuming, each case also leaves behind what a kill *during checkpoint saving* can leave
(Mask R-CNN: a truncated ``epoch_3.pth`` that ``last_checkpoint`` points to, plus the temporary
file of an interrupted atomic write; FPN: an empty ``last_checkpoint``). ``--resume`` must not
pick those up: it says so on stderr and resumes from the complete ``epoch_2.pth``.

Each case: 16 images, batch 4, 3 epochs (12 iterations), a checkpoint per epoch; the reference
run goes in parallel with the interrupted one (one torch thread each).
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mmhat.engine import is_complete_checkpoint

ROOT = Path(__file__).parents[1]
TRAIN = str(ROOT / 'tools' / 'train.py')
ENV = dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE')
TIMEOUT = 900  # seconds per run: generous, the machine is shared
#: logged by the run's first iteration of epoch 3 (logger interval 1)
EPOCH3_STARTED = re.compile(r'Epoch\(train\)\s*\[3\]\[\s*1/')
#: timings differ between runs by nature; everything else logged must be equal
NOT_COMPARED = {'time', 'data_time', 'memory', 'eta'}

# Shared by every run: 3 epochs; log each iteration's own values (window 1, not a 10-iteration
# mean) so that every iteration is compared; no validation (nothing to compare, costs time);
# deterministic seeds.
COMMON_OPTIONS = [
    'train_cfg.max_epochs=3', 'train_dataloader.batch_size=4',
    'default_hooks.logger.interval=1', 'log_processor.window_size=1',
    'default_hooks.checkpoint.interval=1', 'default_hooks.checkpoint.max_keep_ckpts=3',
    'val_dataloader=None', 'val_cfg=None', 'val_evaluator=None',
    'randomness.seed=0', 'randomness.deterministic=True',
]


def det_case(tmp_path: Path):
    """Toy Mask R-CNN; the hook comes from a one-line child config (the toy config in the
    repository may not list it)."""
    data = tmp_path / 'toy_coco'
    subprocess.run([sys.executable, str(ROOT / 'tools' / 'make_toy_coco.py'), '--out',
                    str(data), '--num-train', '16', '--num-val', '4'], check=True, env=ENV)
    config = tmp_path / 'maskrcnn_toy_seeded.py'
    config.write_text(f"_base_ = [{str(ROOT / 'configs/det/maskrcnn_hatnet_t_toy.py')!r}]\n"
                      f"custom_hooks = [dict(type='mmhat.EpochSeedHook')]\n")
    return str(config), str(data)


def seg_case(tmp_path: Path):
    """Toy Semantic FPN (its config lists the hook itself)."""
    data = tmp_path / 'toy_ade'
    subprocess.run([sys.executable, str(ROOT / 'tools' / 'make_toy_ade.py'), '--out',
                    str(data), '--num-train', '16', '--num-val', '4'], check=True, env=ENV)
    return str(ROOT / 'configs' / 'seg' / 'fpn_hatnet_t_toy.py'), str(data)


def truncated_checkpoint(work_dir: Path) -> str:
    """What a kill while mmengine writes epoch_3.pth in place leaves: half a file, already
    recorded, plus the temporary file of an atomic write killed before its rename."""
    complete = (work_dir / 'epoch_2.pth').read_bytes()
    (work_dir / 'epoch_3.pth').write_bytes(complete[:len(complete) // 2])
    (work_dir / 'epoch_3.pth.partial-99999').write_bytes(complete[:1000])
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'epoch_3.pth'))
    return 'epoch_3.pth'


def empty_record(work_dir: Path) -> str:
    """What a kill between truncating and rewriting ``last_checkpoint`` leaves."""
    (work_dir / 'last_checkpoint').write_text('')
    return "records ''"


def command(config: str, data: str, work_dir: Path, *extra: str):
    return [sys.executable, TRAIN, config, '--data-root', data, '--work-dir', str(work_dir),
            *extra, '--cfg-options', *COMMON_OPTIONS]


def run_until_epoch3_then_kill(cmd, cwd: Path) -> str:
    """Start ``cmd``, SIGKILL it once it logs epoch 3's first iteration; return its output."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(TIMEOUT, proc.kill)  # a hung run must not hang the suite
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if EPOCH3_STARTED.search(line):
                proc.send_signal(signal.SIGKILL)  # no cleanup, no final checkpoint
                break
    finally:
        watchdog.cancel()
        proc.wait()
        proc.stdout.close()
    log = ''.join(lines)
    assert proc.returncode == -signal.SIGKILL, f'not killed in epoch 3:\n{log[-3000:]}'
    return log


def logged(vis_dirs):
    """``{(epoch, iter): {key: value}}`` of the training iterations in ``scalars.json``."""
    rows = {}
    for vis_dir in vis_dirs:
        for line in (vis_dir / 'vis_data' / 'scalars.json').read_text().splitlines():
            row = json.loads(line)
            if 'loss' in row:
                rows[row['epoch'], row['iter']] = {k: v for k, v in row.items()
                                                   if k not in NOT_COMPARED}
    return rows


def timestamp_dirs(work_dir: Path):
    return {p.parent.parent for p in work_dir.glob('*/vis_data/scalars.json')}


@pytest.mark.slow
@pytest.mark.parametrize('make_case, break_save', [(det_case, truncated_checkpoint),
                                                   (seg_case, empty_record)],
                         ids=['maskrcnn', 'semantic_fpn'])
def test_killed_training_resumes_exactly(tmp_path, make_case, break_save):
    config, data = make_case(tmp_path)
    ref_dir, run_dir = tmp_path / 'reference', tmp_path / 'interrupted'
    with open(tmp_path / 'reference.log', 'w') as ref_log:
        reference = subprocess.Popen(command(config, data, ref_dir), cwd=tmp_path, env=ENV,
                                     stdout=ref_log, stderr=subprocess.STDOUT)
        try:
            run_until_epoch3_then_kill(command(config, data, run_dir), tmp_path)
        finally:
            ref_rc = reference.wait(timeout=TIMEOUT)
    assert ref_rc == 0, (tmp_path / 'reference.log').read_text()[-3000:]
    assert (run_dir / 'epoch_2.pth').is_file() and not (run_dir / 'epoch_3.pth').exists()

    noted = break_save(run_dir)
    before = timestamp_dirs(run_dir)
    resumed = subprocess.run(command(config, data, run_dir, '--resume'), cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the broken file or record was noticed, named, and passed over for the complete one
    warning = [line for line in resumed.stderr.splitlines() if line.startswith('warning:')]
    assert warning and noted in warning[0] and warning[0].endswith('epoch_2.pth'), \
        resumed.stderr[-3000:]
    assert 'resumed epoch: 2' in resumed.stdout + resumed.stderr

    expected = logged(timestamp_dirs(ref_dir))
    got = logged(timestamp_dirs(run_dir) - before)
    assert sorted(got) == [(3, i) for i in range(9, 13)]  # epoch 3 = iterations 9..12
    assert set(expected) == {(e, i) for e in (1, 2, 3) for i in range(4 * e - 3, 4 * e + 1)}
    for key in sorted(got):
        assert any(k.endswith('loss') or 'loss_' in k for k in got[key]), got[key]
        assert got[key] == expected[key], f'epoch 3, iteration {key[1]} differs'
    # the resumed run wrote a complete epoch_3.pth over the truncated one
    assert is_complete_checkpoint(str(run_dir / 'epoch_3.pth'))
