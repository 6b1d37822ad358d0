"""Classification heads: the authors' ImageNet classifiers on mmhat's backbones, for mmpretrain.

mmpretrain is an optional extra (``pip install 'mmhat[cls]'``): nothing here imports it until
a config builds an :class:`OfficialClsHead`, so mmdet and mmseg users never need it.
"""
from mmhat.registry import MODELS
from .pool_linear import (MISSING_MMPRETRAIN, OFFICIAL_HEADS, PoolLinear, PoolLinearHead,
                          head_family, official_head_state_dict)

__all__ = ['MISSING_MMPRETRAIN', 'OFFICIAL_HEADS', 'PoolLinear', 'PoolLinearHead',
           'build_official_cls_head', 'head_family', 'official_head_state_dict']


@MODELS.register_module(name='OfficialClsHead')
def build_official_cls_head(**kwargs):
    """``type='mmhat.OfficialClsHead'``: an mmpretrain ``ClsHead`` computing the official
    classifier of a family (:class:`mmhat.models.heads.cls_head.OfficialClsHead`).

    Registered as a builder so that mmpretrain is imported only when a config asks for it.

    Raises:
        ImportError: mmpretrain is not installed, with the command that installs it.
    """
    try:
        from .cls_head import OfficialClsHead
    except ImportError as error:
        if 'mmpretrain' not in str(error) and 'torchvision' not in str(error):
            raise
        raise ImportError(f'{MISSING_MMPRETRAIN} ({error})') from error
    return OfficialClsHead(**kwargs)
