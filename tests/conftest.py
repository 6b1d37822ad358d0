"""Shared test set-up: one torch thread (these machines have 2 cores and OpenMP
spin-waits under contention), and ``tests/`` on ``sys.path`` for the helper modules."""
import os
import sys
from pathlib import Path

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def num_threads():
    """Run a test at a given torch thread count: ``num_threads(2)``; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first (the order within each group kept): ``make test``
    hands whole files to its processes in collection order, and a long file handed out last
    would run alone at the end while the other process waits."""
    items.sort(key=lambda item: item.get_closest_marker('slow') is None)


def pytest_terminal_summary(terminalreporter):
    """Say when tests/cls/ was left out (no mmpretrain or no torchvision for this torch)."""
    from cls_extra import REQUIRED, missing
    if not REQUIRED and missing():
        terminalreporter.write_line(
            f'tests/cls/ not collected: the classification extra does not import here '
            f'({missing()}); make test-compat runs it (WITH_CLS=1 requires it).')
