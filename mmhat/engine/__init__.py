"""Training-time pieces: CPU mixed precision and the helpers behind ``tools/``."""
from .amp import BF16AutocastOptimWrapper
from .checkpointing import (AtomicLocalBackend, is_complete_checkpoint,
                            latest_complete_checkpoint, use_atomic_checkpoints)
from .hooks import EpochSeedHook  # noqa: F401  registers mmhat.EpochSeedHook
from .launch import (DataNotFoundError, check_checkpoints, check_data, prepare_config,
                     setup_cpu_distributed)

__all__ = [
    'AtomicLocalBackend', 'is_complete_checkpoint', 'latest_complete_checkpoint',
    'use_atomic_checkpoints', 'BF16AutocastOptimWrapper', 'DataNotFoundError', 'check_checkpoints', 'check_data',
    'prepare_config', 'setup_cpu_distributed'
]
