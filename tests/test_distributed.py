"""Multi-process training proven, not assumed: 2 ranks with torchrun on the CPU (gloo)
train the toy Mask R-CNN for a few iterations and evaluate, exercising DDP, the distributed
sampler and metric gathering through tools/train.py exactly as a user launches it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_two_process_cpu_training_and_evaluation(tmp_path):
    data = tmp_path / 'toy'
    subprocess.run([sys.executable, str(ROOT / 'tools' / 'make_toy_coco.py'), '--out',
                    str(data), '--num-train', '16', '--num-val', '8'], check=True)
    work_dir = tmp_path / 'wd'
    env = dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
           '--master_port=29531', str(ROOT / 'tools' / 'train.py'),
           str(ROOT / 'configs' / 'det' / 'maskrcnn_hatnet_t_toy.py'), '--launcher', 'pytorch',
           '--data-root', str(data), '--work-dir', str(work_dir), '--cfg-options',
           'train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
           'train_dataloader.batch_size=2', 'default_hooks.logger.interval=1']
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # 16 images, 2 ranks x 2 images: 4 iterations per rank, and the world size is 2
    # mmengine's environment report ("GPU number" is its name for the world size)
    assert 'Distributed training: True' in log and 'GPU number: 2' in log, log[-3000:]
    assert 'Epoch(train) [1][4/4]' in log, log[-3000:]
    # rank 0 gathered the 8 validation images of both ranks into one COCO evaluation
    scalars = [json.loads(line) for line in
               next(work_dir.glob('*/vis_data/scalars.json')).read_text().splitlines()]
    final = [s for s in scalars if 'coco/bbox_mAP' in s]
    assert final and 0.0 <= final[-1]['coco/bbox_mAP'] <= 1.0
    assert (work_dir / 'epoch_1.pth').is_file()
