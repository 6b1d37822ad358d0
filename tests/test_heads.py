"""The classification head's parts that need no mmpretrain (they run in every test
environment): the official checkpoints split whole between backbone and head, the plain
head's math and errors, and the message when mmpretrain is missing. The mmpretrain
classifiers themselves: tests/cls/."""
import sys

import pytest
import torch

import reference as R
from mmhat.models.backbones import registered_families
from mmhat.models.heads import (OFFICIAL_HEADS, PoolLinearHead, head_family,
                                official_head_state_dict)
from mmhat.models.heads.pool_linear import OFFICIAL_HEADS as TABLE
from mmhat.registry import MODELS

FAMILIES = [cls for cls in registered_families() if cls.__name__ in TABLE]
VARIANTS = [(cls, arch) for cls in FAMILIES for arch in cls.arch_zoo]


def test_the_table_covers_the_four_families():
    assert OFFICIAL_HEADS is TABLE
    assert sorted(cls.__name__ for cls in FAMILIES) == sorted(TABLE) == [
        'GroupMixFormer', 'HATNet', 'ShuntedTransformer', 'TransCNN']


@pytest.mark.parametrize('cls,arch', VARIANTS, ids=[f'{c.__name__}-{a}' for c, a in VARIANTS])
def test_official_checkpoint_splits_whole_between_backbone_and_head(cls, arch):
    """Every key of the official checkpoint is the backbone's, the head's, or one the official
    forward never uses; the head's are exactly the official classifier's and fit the head
    the configs build; parameter counts add up to the official classifier's."""
    manifest = R.manifest(f'{cls.reference_name}-{arch}')
    sd = {k: torch.empty(v['shape']) for k, v in manifest['state_dict'].items()}
    conversion = cls.convert_checkpoint(sd)
    head = official_head_state_dict(sd, cls)
    classifier = [k for k in sd if k.startswith(tuple(manifest['classifier_prefixes']))]
    unused = [k for k in conversion.dropped if k not in classifier]
    assert sorted(conversion.dropped) == sorted(classifier + unused)
    assert len(head) == len(classifier)  # the head takes the whole official classifier
    assert all(reason == 'never used by the official forward'
               for k, reason in conversion.dropped.items() if k in unused)
    assert len(conversion.state_dict) + len(head) + len(unused) == len(sd)
    width = sd[next(k for k in classifier if k.endswith('weight') and sd[k].dim() == 2)].shape
    model = PoolLinearHead(num_classes=width[0], in_channels=width[1], **TABLE[cls.__name__])
    model.load_state_dict(head, strict=True)
    n_head = sum(p.numel() for p in model.parameters())
    assert manifest['params_backbone'] + n_head == manifest['params_total']


def test_head_keys_of_another_family_are_not_taken():
    hat = {k: torch.empty(v['shape']) for k, v in R.manifest('hatnet-tiny')['state_dict'].items()}
    assert official_head_state_dict(hat, 'ShuntedTransformer') == {}
    assert set(official_head_state_dict(hat, 'mmhat.HATNet')) == {'fc.weight', 'fc.bias'}


def test_pool_linear_head_math_and_errors():
    torch.manual_seed(0)
    head = PoolLinearHead(num_classes=7, in_channels=5, norm_cfg=dict(type='BN')).eval()
    x = torch.randn(2, 5, 3, 4)
    ref = head.fc(head.norm(x).mean(dim=(2, 3)))
    torch.testing.assert_close(head((x.new_zeros(1), x)), ref)  # the last map of a tuple
    with pytest.raises(ValueError, match=r'in_channels to the backbone\'s last out_channels'):
        head(torch.randn(2, 6, 3, 4))
    with pytest.raises(ValueError, match='num_classes must be a positive int'):
        PoolLinearHead(num_classes=0)
    with pytest.raises(ValueError, match=r'dropout must be in \[0, 1\)'):
        PoolLinearHead(dropout=1.0)
    with pytest.raises(ValueError, match="family='Swin' is not an mmhat backbone family; use "
                                         'one of HATNet, TransCNN'):
        head_family('Swin')


def test_without_mmpretrain_the_head_says_how_to_install_it(monkeypatch):
    """mmdet/mmseg users need no mmpretrain; a classification config without it fails with
    the install command, not an import trace from inside the registry."""
    for name in [m for m in sys.modules if m.split('.')[0] == 'mmpretrain'] + ['mmpretrain']:
        monkeypatch.setitem(sys.modules, name, None)  # import mmpretrain... -> ImportError
    monkeypatch.delitem(sys.modules, 'mmhat.models.heads.cls_head', raising=False)
    with pytest.raises(ImportError, match=r"pip install 'mmhat\[cls\]'"):
        MODELS.build(dict(type='mmhat.OfficialClsHead', num_classes=10, in_channels=8,
                          family='HATNet'))


def test_mmhat_models_does_not_import_mmpretrain():
    """Importing the backbones (what every mmdet/mmseg config does) leaves mmpretrain alone."""
    import subprocess
    code = ('import sys, mmhat.models, mmhat.registry; '
            'print(any(m.split(".")[0] in ("mmpretrain", "torchvision") for m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == 'False'
