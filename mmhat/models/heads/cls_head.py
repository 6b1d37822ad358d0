"""``mmhat.OfficialClsHead``: the official classifier of a family as an mmpretrain ``ClsHead``.

Imports mmpretrain: only :func:`mmhat.models.heads.build_official_cls_head` imports this file.
"""
from typing import Optional, Tuple, Union

import torch
from mmengine.logging import print_log
from mmpretrain.models.heads import ClsHead

from mmhat.checkpoint import (CheckpointError, check_checkpoint_source, extract_state_dict,
                              load_checkpoint_file, load_state_dict_strict)
from .pool_linear import PoolLinear, head_family, official_head_state_dict


class OfficialClsHead(PoolLinear, ClsHead):
    """Optional norm, mean over H and W, dropout and linear on the backbone's last map: the
    official ImageNet classifier of ``family`` (``pool_linear.py`` lists each family's).

    Args:
        num_classes: classes (1000 for the official ImageNet checkpoints).
        in_channels: channels of the backbone's last map.
        family: the backbone family (``'HATNet'``, ``'TransCNN'``, ``'ShuntedTransformer'``,
            ``'GroupMixFormer'``) whose official checkpoints this head reads.
        dropout: dropout before the linear layer (HAT-Net and TransCNN: 0.2).
        norm_cfg: a norm on the map before pooling (GroupMixFormer: ``dict(type='BN')``).
        loss, topk, cal_acc: as mmpretrain's ``ClsHead``.
        init_cfg: ``dict(type='Pretrained', checkpoint=...)`` loads the classifier of an
            official checkpoint (or the ``head.`` keys of an mmpretrain one) strictly; by
            default the linear layer is drawn as the authors do (truncated normal, std 0.02).
    """

    def __init__(self,
                 num_classes: int,
                 in_channels: int,
                 family: str,
                 dropout: float = 0.0,
                 norm_cfg: Optional[dict] = None,
                 loss: dict = dict(type='CrossEntropyLoss', loss_weight=1.0),
                 topk: Union[int, Tuple[int]] = (1, ),
                 cal_acc: bool = False,
                 init_cfg: Optional[dict] = dict(type='TruncNormal', layer='Linear', std=0.02,
                                                 bias=0.)):
        super().__init__(loss=loss, topk=topk, cal_acc=cal_acc, init_cfg=init_cfg)
        self.family = head_family(family)
        self._build_layers(num_classes, in_channels, dropout, norm_cfg)

    def pre_logits(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        return self.drop(self.pooled(feats))  # (B, C)

    def forward(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        return self.fc(self.pre_logits(feats))  # (B, num_classes)

    def init_weights(self) -> None:
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            self.load_pretrained(cfg['checkpoint'])
            self._is_init = True
            return
        super().init_weights()

    def load_pretrained(self, filename: str) -> None:
        """Load the classifier of an official checkpoint of :attr:`family` (or the ``head.``
        keys of an mmpretrain classifier's), strictly: every head weight from the file.

        Raises:
            CheckpointError: the file holds no classifier of this family, or one that does
                not fit (another number of classes, a missing norm), saying what to change.
        """
        name = f'mmhat.OfficialClsHead(family={self.family.__name__})'
        check_checkpoint_source(filename, name)
        checkpoint = load_checkpoint_file(filename)
        sd = extract_state_dict(checkpoint, prefix='')
        if any(key.startswith('backbone.') for key in sd):  # an mmpretrain classifier
            head = {k[len('head.'):]: v for k, v in sd.items() if k.startswith('head.')}
            kind = 'mmpretrain'
        else:
            head = official_head_state_dict(sd, self.family)
            kind = 'official'
        if not head:
            rules = ', '.join(pattern for pattern, _ in self.family.official_head_rules)
            raise CheckpointError(
                f'{filename} holds no classifier of an official {self.family.__name__} '
                f'checkpoint (keys matching {rules}) and no head.* keys: it is a backbone-only '
                f'or another family\'s checkpoint. Keep it in the backbone\'s init_cfg and set '
                f'the head\'s init_cfg=None to train the classifier from scratch.')
        fc = head.get('fc.weight')
        hint = ''
        if fc is not None and fc.shape[0] != self.num_classes:
            hint = (f'The checkpoint classifies {fc.shape[0]} classes, this head '
                    f'{self.num_classes}: to fine-tune on another label set, load only the '
                    f'backbone (model.head.init_cfg=None).')
        load_state_dict_strict(self, head, source=filename, hint=hint)
        print_log(f'OfficialClsHead: loaded {len(head)} tensors of the {kind} '
                  f'{self.family.__name__} classifier from {filename}', logger='current')
