"""mmhat's registries.

Each is a child of mmengine's root registry with the scope ``mmhat``, so an mmdet or an
mmseg config can say ``type='mmhat.HATNet'`` (or ``'mmhat.BF16AutocastOptimWrapper'``, ``'mmhat.EpochSeedHook'``)
and mmengine imports the module that defines it by itself (no ``custom_imports``).
Registering in the root instead would let a same-named class of mmdet or mmseg silently
shadow ours.
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmhat', locations=['mmhat.models'])
OPTIM_WRAPPERS = Registry('optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='mmhat',
                          locations=['mmhat.engine'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mmhat', locations=['mmhat.engine'])
