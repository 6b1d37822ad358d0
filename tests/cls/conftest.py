"""The classification tests need mmpretrain and a torchvision built for this torch (the
``cls`` extra). ``make test-compat`` installs them (``WITH_CLS=1``) and then requires them:
there a missing package fails the run instead of skipping a test. Elsewhere (``make test``
on torch 2.13, where no registry torchvision loads) this folder is not collected, and the
summary says so (``tests/conftest.py``)."""
import pytest

from cls_extra import REQUIRED, missing

if missing() and REQUIRED:
    raise pytest.UsageError(
        f'WITH_CLS=1 but the classification extra does not import ({missing()}). '
        f'Run `make install WITH_CLS=1 VENV=...` (make test-compat does) or pip install '
        f"'mmhat[cls]' with a torchvision that matches your torch.")
collect_ignore_glob = ['test_*.py'] if missing() else []
