"""Training-time pieces: CPU mixed precision and the helpers behind ``tools/``."""
from .amp import BF16AutocastOptimWrapper
from .launch import (DataNotFoundError, check_checkpoints, check_data, prepare_config,
                     setup_cpu_distributed)

__all__ = [
    'BF16AutocastOptimWrapper', 'DataNotFoundError', 'check_checkpoints', 'check_data',
    'prepare_config', 'setup_cpu_distributed'
]
