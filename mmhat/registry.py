"""mmhat's registries.

``MODELS`` is a child of mmengine's root registry with its own scope, so an mmdet or an
mmseg config can say ``type='mmhat.HATNet'`` and mmengine imports ``mmhat.models`` by
itself (no ``custom_imports``). Registering in the root instead would let a same-named
class of mmdet or mmseg silently shadow ours.
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmhat', locations=['mmhat.models'])
