"""One module per backbone family; importing registers them in ``mmhat.registry.MODELS``."""
from .groupmixformer import GroupMixFormer
from .hatnet import HATNet
from .shunted import ShuntedTransformer
from .transcnn import TransCNN

__all__ = ['GroupMixFormer', 'HATNet', 'ShuntedTransformer', 'TransCNN']
