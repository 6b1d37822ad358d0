"""The reference data helpers of the tests: :mod:`mmhat.testing` (one implementation, shared
with ``tools/gpu_check.py``)."""
from mmhat.testing import *  # noqa: F401,F403
