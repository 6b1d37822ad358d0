"""Whether the classification extra (mmpretrain, and a torchvision built for this torch)
imports here: ``tests/cls/`` runs only where it does (``make test-compat``, ``WITH_CLS=1``)."""
import functools
import importlib
import os

#: set by ``make test-compat`` (``WITH_CLS=1``): the extra must be there
REQUIRED = os.environ.get('WITH_CLS') == '1'


@functools.lru_cache(maxsize=None)
def missing() -> str:
    """Why the extra does not import (``''`` when it does)."""
    for name in ('torchvision', 'mmpretrain'):
        try:
            importlib.import_module(name)
        except Exception as error:  # ImportError, or torchvision's operator mismatch
            return f'{name}: {type(error).__name__}: {str(error).splitlines()[0][:120]}'
    return ''
