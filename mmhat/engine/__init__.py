"""Training-time pieces: CPU mixed precision, resumable checkpoints, reproducible epochs,
and the helpers behind ``tools/``. Importing this package changes nothing outside mmhat."""
from .amp import BF16AutocastOptimWrapper
from .checkpointing import (AtomicLocalBackend, ResumeCompatHook, is_complete_checkpoint,
                            latest_complete_checkpoint, resumable_checkpoints,
                            use_atomic_checkpoints)
from .hooks import EpochSeedHook
from .launch import (DataNotFoundError, check_checkpoints, check_data, prepare_config,
                     route_test_checkpoint, setup_cpu_distributed)

__all__ = [
    'AtomicLocalBackend', 'BF16AutocastOptimWrapper', 'DataNotFoundError', 'EpochSeedHook',
    'ResumeCompatHook', 'check_checkpoints', 'check_data', 'is_complete_checkpoint',
    'latest_complete_checkpoint', 'prepare_config', 'resumable_checkpoints',
    'route_test_checkpoint',
    'setup_cpu_distributed', 'use_atomic_checkpoints'
]
