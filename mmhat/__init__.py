"""mmhat: hierarchical-attention backbones for MMDetection and MMSegmentation.

Importing mmhat (which any ``type='mmhat.X'`` config does) only makes its registries
available; ``mmhat.models`` registers the backbones in ``mmhat.registry.MODELS``. Nothing
outside mmhat is changed on import: what needs a patch of torch, mmengine or mmcv asks for
it in a ``with`` block (see :mod:`mmhat.checkpoint` and :mod:`mmhat.engine`).
"""
from .version import __version__  # noqa: F401
