"""mmhat: hierarchical-attention backbones for MMDetection and MMSegmentation.

Importing mmhat (which any ``type='mmhat.X'`` config does) registers the backbones in
``mmhat.registry.MODELS`` and allow-lists the checkpoint metadata types that torch's
``weights_only`` loading needs (see :mod:`mmhat.checkpoint`).
"""
from .checkpoint import register_safe_globals
from .version import __version__  # noqa: F401

register_safe_globals()
