from .backbones import *  # noqa: F401,F403  registers every backbone in mmhat.registry.MODELS
from .heads import *  # noqa: F401,F403  registers mmhat.OfficialClsHead (mmpretrain: lazily)
