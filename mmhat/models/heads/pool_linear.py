"""The official classifiers' computation, in plain torch: optional norm, mean over H and W,
dropout, linear.

| family | official head (checkpoint keys) | here |
|---|---|---|
| HAT-Net, TransCNN | global average pool, `classifier` = Dropout(0.2), Linear | `dropout=0.2` |
| Shunted | mean over tokens (its stage-4 norm is the backbone's), `head` = Linear | defaults |
| GroupMixFormer | `norm4` = BatchNorm (eps 1e-5) on the stage-4 map, mean, `head` = Linear | `norm_cfg=dict(type='BN')` |

:class:`PoolLinear` holds the layers (``norm``, ``drop``, ``fc``) and the forward; the
mmpretrain head (``cls_head.py``) and :class:`PoolLinearHead` (the same module without
mmpretrain, for FLOP counts and tools) both inherit it, so their keys and math are one.
"""
from typing import Dict, Optional, Sequence, Tuple, Type, Union

import torch
from mmcv.cnn import build_norm_layer
from torch import nn

from mmhat.checkpoint import StateDict, select_state_dict

MISSING_MMPRETRAIN = ("mmhat.OfficialClsHead is an mmpretrain head, and mmpretrain does not "
                      "import here: install the classification extra with pip install "
                      "'mmhat[cls]' (mmpretrain 1.2 and a torchvision built for your torch; "
                      "docs/imagenet.md)")


def head_family(family: Union[str, type]) -> type:
    """The backbone class named by ``family`` (``'HATNet'``, ``'mmhat.HATNet'`` or the class),
    whose ``official_head_rules`` say which official keys are the classifier's.

    Raises:
        ValueError: not an mmhat backbone family, naming the ones there are.
    """
    from mmhat.models.backbones import registered_families
    families = registered_families()
    if isinstance(family, type) and family in families:
        return family
    name = family[len('mmhat.'):] if isinstance(family, str) and family.startswith('mmhat.') \
        else family
    found = next((cls for cls in families if cls.__name__ == name), None)
    if found is None:
        names = ', '.join(cls.__name__ for cls in families)
        raise ValueError(f'family={family!r} is not an mmhat backbone family; use one of '
                         f'{names} (the backbone whose official classifier this head is)')
    return found


def official_head_state_dict(state_dict: StateDict, family: Union[str, type]) -> StateDict:
    """The official classifier's weights of a checkpoint, under :class:`PoolLinear`'s key
    names (``fc.*``, ``norm.*``): the keys ``family.official_head_rules`` match. A pure
    function."""
    return select_state_dict(state_dict, head_family(family).official_head_rules)


class PoolLinear:
    """Mixin: ``norm`` (optional) -> mean over H and W -> ``drop`` -> ``fc``, on the last
    feature map of a backbone (NCHW)."""

    def _build_layers(self, num_classes: int, in_channels: int, dropout: float,
                      norm_cfg: Optional[dict]) -> None:
        for name, value in (('num_classes', num_classes), ('in_channels', in_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f'{type(self).__name__}: {name} must be a positive int, got '
                                 f'{value!r}')
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f'{type(self).__name__}: dropout must be in [0, 1), got {dropout!r}')
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.norm = build_norm_layer(norm_cfg, in_channels)[1] if norm_cfg else None
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def pooled(self, feats: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        """``(B, C, H, W)`` (or a tuple of maps, of which the last is used) -> ``(B, C)``."""
        x = feats if isinstance(feats, torch.Tensor) else feats[-1]
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'{type(self).__name__} takes the backbone\'s last map as (B, {self.in_channels}, '
                f'H, W), got {tuple(x.shape)}: set in_channels to the backbone\'s last '
                f'out_channels (and keep stage 3 in its out_indices)')
        if self.norm is not None:
            x = self.norm(x)
        return x.mean(dim=(2, 3))  # (B, C)

    def logits(self, feats) -> torch.Tensor:
        return self.fc(self.drop(self.pooled(feats)))  # (B, num_classes)


class PoolLinearHead(PoolLinear, nn.Module):
    """:class:`PoolLinear` as a plain module (no mmpretrain): what ``tools/model_index.py``
    counts the classifiers' parameters and FLOPs with."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 512, dropout: float = 0.0,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self._build_layers(num_classes, in_channels, dropout, norm_cfg)

    def forward(self, feats) -> torch.Tensor:
        return self.logits(feats)


#: The official head of each family, as OfficialClsHead arguments (the configs' values).
OFFICIAL_HEADS: Dict[str, dict] = {
    'HATNet': dict(dropout=0.2),
    'TransCNN': dict(dropout=0.2),
    'ShuntedTransformer': dict(),
    'GroupMixFormer': dict(norm_cfg=dict(type='BN', eps=1e-5)),
}
