"""One module per backbone family; importing registers them in ``mmhat.registry.MODELS``.

Imported in the order of the papers' table, which :func:`registered_families` (and with it
the model zoo, the reports and the test ids) keeps.
"""
from typing import List

from mmhat.registry import MODELS
from .base import PyramidBackbone
from .hatnet import HATNet
from .transcnn import TransCNN
from .shunted import ShuntedTransformer  # isort: skip
from .groupmixformer import GroupMixFormer  # isort: skip

__all__ = ['GroupMixFormer', 'HATNet', 'ShuntedTransformer', 'TransCNN', 'registered_families']


def registered_families() -> List[type]:
    """Every :class:`PyramidBackbone` family in mmhat's registry, in registration order: the
    four above, then any registered since (a plugin's, or a test's toy family)."""
    return [cls for cls in MODELS.module_dict.values()
            if isinstance(cls, type) and issubclass(cls, PyramidBackbone)]
