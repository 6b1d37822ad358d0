"""Bad input gets a clear error raised where the mistake is, for every backbone family."""
import pytest
import torch

import reference as R
from mmhat.checkpoint import CheckpointError
from mmhat.registry import MODELS

#: family -> (registered type, smallest arch, its reference name, a family whose checkpoint it is given)
FAMILIES = {
    'hatnet': ('mmhat.HATNet', 'tiny', 'hatnet-tiny', 'shunted-tiny'),
    'transcnn': ('mmhat.TransCNN', 'tiny', 'transcnn-tiny', 'hatnet-tiny'),
    'shunted': ('mmhat.ShuntedTransformer', 'tiny', 'shunted-tiny', 'groupmixformer-mini'),
    'groupmixformer': ('mmhat.GroupMixFormer', 'mini', 'groupmixformer-mini', 'transcnn-tiny'),
}


def build(family, **kwargs):
    type_name, arch = FAMILIES[family][:2]
    return MODELS.build(dict(type=type_name, arch=kwargs.pop('arch', arch), **kwargs))


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('x,match', [
    (torch.randn(3, 64, 64), r'expects a 4-D \(B, C, H, W\) tensor, got \(3, 64, 64\)'),
    (torch.randn(1, 1, 3, 64, 64), r'4-D \(B, C, H, W\) tensor, got \(1, 1, 3, 64, 64\)'),
    (torch.randn(1, 1, 64, 64), r'expects 3 input channels \(RGB\), got 1'),
    (torch.randn(1, 4, 64, 64), r'expects 3 input channels \(RGB\), got 4'),
    (torch.randn(1, 3, 16, 64), r'at least 32x32 pixels, got 16x64'),
], ids=['3d', '5d', 'gray', 'rgba', 'too_small'])
def test_bad_input(family, x, match):
    with pytest.raises(ValueError, match=match):
        build(family).eval()(x)


@pytest.mark.parametrize('family', FAMILIES)
def test_unknown_arch_lists_valid_names(family):
    names = "', '".join(MODELS.get(FAMILIES[family][0]).arch_zoo)
    with pytest.raises(ValueError, match=rf"unknown arch 'huge' .*valid names: '{names}'"):
        build(family, arch='huge')


@pytest.mark.parametrize('family', FAMILIES)
def test_arch_dict_missing_a_key(family):
    arch = dict(MODELS.get(FAMILIES[family][0]).arch_zoo[FAMILIES[family][1]])
    del arch['depths']
    with pytest.raises(ValueError, match=r"arch dict is missing \['depths'\]"):
        build(family, arch=arch)


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('kwargs,match', [
    (dict(out_indices=(0, 4)), r'out_indices must be stage indices in \[0, 3\], got \(0, 4\)'),
    (dict(out_indices=(-1, )), r'out_indices must be stage indices in \[0, 3\], got \(-1,\)'),
    (dict(out_indices=()), r'out_indices must be stage indices in \[0, 3\], got \(\)'),
    (dict(out_indices=(2, 1)), 'out_indices must be increasing and unique'),
    (dict(frozen_stages=5), r'frozen_stages must be an int in \[-1, 4\]'),
    (dict(frozen_stages=-2), r'frozen_stages must be an int in \[-1, 4\]'),
    (dict(frozen_stages=1.5), r'frozen_stages must be an int in \[-1, 4\]'),
], ids=['out_of_range', 'negative', 'empty', 'unordered', 'frozen', 'frozen_negative',
        'frozen_float'])
def test_bad_stage_arguments(family, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(family, **kwargs)


@pytest.mark.parametrize('family', FAMILIES)
def test_checkpoint_of_another_family(family, tmp_path):
    other = FAMILIES[family][3]
    path = R.write_official_checkpoint(other, tmp_path / f'{other}.pth', with_case_overrides=False)
    model = build(family, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    type_name = FAMILIES[family][0].split('.')[1]
    with pytest.raises(CheckpointError, match=rf"(?s)does not fit {type_name}:.*(missing|unexpected) "
                       rf"keys: .*Is this a checkpoint of {type_name} arch="):
        model.init_weights()


@pytest.mark.parametrize('family', FAMILIES)
def test_missing_and_truncated_checkpoint_files(family, tmp_path):
    model = build(family, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'no.pth')))
    with pytest.raises(CheckpointError, match='checkpoint file not found: .*no.pth'):
        model.init_weights()
    path = R.write_official_checkpoint(FAMILIES[family][2], tmp_path / 'cut.pth',
                                       with_case_overrides=False)
    path.write_bytes(path.read_bytes()[:4096])
    model = build(family, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        model.init_weights()
