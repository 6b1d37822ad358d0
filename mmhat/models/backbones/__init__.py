"""One module per backbone family; importing registers them in ``mmhat.registry.MODELS``."""
from .hatnet import HATNet
from .transcnn import TransCNN

__all__ = ['HATNet', 'TransCNN']
