"""Training-time pieces: CPU mixed precision and the helpers behind ``tools/``."""
from .amp import BF16AutocastOptimWrapper
from .checkpointing import (AtomicLocalBackend, is_complete_checkpoint,
                            latest_complete_checkpoint, use_atomic_checkpoints)
from .hooks import EpochSeedHook
from .launch import (DataNotFoundError, check_checkpoints, check_data, prepare_config,
                     setup_cpu_distributed)

__all__ = [
    'AtomicLocalBackend', 'BF16AutocastOptimWrapper', 'DataNotFoundError', 'EpochSeedHook',
    'check_checkpoints', 'check_data', 'is_complete_checkpoint', 'latest_complete_checkpoint',
    'prepare_config', 'setup_cpu_distributed', 'use_atomic_checkpoints'
]
