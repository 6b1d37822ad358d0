"""A fifth family is one file: ``ToyNet`` below is all a family writes (its variant table,
its facts, a stem, a stage builder, its blocks and checkpoint rules), and it gets the whole
backbone contract from :class:`PyramidBackbone`: any input size, ``out_indices``,
``frozen_stages``, ``norm_eval``, ``with_cp``, channels-last weights, official-checkpoint
conversion with its strict report, and the bad-input errors."""
from typing import List

import pytest
import torch
from mmcv.cnn import ConvModule, build_activation_layer, build_norm_layer
from torch import nn

import backbone_contract as contract
from mmhat.models.backbones.base import PyramidBackbone, PyramidStage
from mmhat.models.layers import drop_path


# ----------------------------------------------------------------------------- the family
class ToyBlock(nn.Module):
    """``x + DropPath(act(dwconv(norm(x))))``."""

    def __init__(self, dims: int, rate: float, norm_cfg: dict, act_cfg: dict) -> None:
        super().__init__()
        self.norm = build_norm_layer(norm_cfg, dims)[1]
        self.conv = nn.Conv2d(dims, dims, 3, padding=1, groups=dims)
        self.act = build_activation_layer(act_cfg)
        self.drop_path = drop_path(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.act(self.conv(self.norm(x))))


class ToyStage(PyramidStage):

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_blocks(self.run(self.patch_embed, x))


class ToyNet(PyramidBackbone):
    """Conv stem of stride 4, then stages of depthwise-conv blocks."""
    arch_zoo = {
        'tiny':  dict(embed_dims=(8, 16, 24, 32),  depths=(1, 1, 2, 1)),
        'small': dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 2, 1)),
    }
    default_arch = smallest_arch = 'tiny'
    default_act_cfg = dict(type='ReLU')
    reference_name = 'toy'
    # its "official" classifier names the stem `conv_stem` and the stages `layers`
    official_rename_rules = [(r'^conv_stem\.', 'stem.'), (r'^layers\.(\d+)\.', r'stages.\1.')]
    official_drop_rules = [(r'^fc\.', 'classification head')]

    def build_stem(self) -> nn.Module:
        return ConvModule(self.in_channels, self.arch_settings['embed_dims'][0], 3, stride=4,
                          padding=1, norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)

    def build_stage(self, i: int, drop_path_rates: List[float]) -> ToyStage:
        dims = self.arch_settings['embed_dims']
        entry = nn.Identity() if i == 0 else ConvModule(
            dims[i - 1], dims[i], 3, stride=2, padding=1, norm_cfg=self.norm_cfg,
            act_cfg=self.act_cfg)
        return ToyStage(entry, [ToyBlock(dims[i], rate, self.norm_cfg, self.act_cfg)
                                for rate in drop_path_rates])


# ----------------------------------------------------------------------------- its contract
@pytest.fixture(scope='module')
def official(tmp_path_factory):
    """A checkpoint as the toy's authors would publish it: their key names, a classifier."""
    torch.manual_seed(0)
    sd = {k.replace('stem.', 'conv_stem.', 1).replace('stages.', 'layers.', 1): v
          for k, v in contract.build(ToyNet).state_dict().items()}
    sd['fc.weight'], sd['fc.bias'] = torch.randn(10, 32), torch.randn(10)
    path = tmp_path_factory.mktemp('toy') / 'toy_official.pth'
    torch.save({'model': sd}, path)
    return path


def test_any_size_shapes_and_strides():
    contract.check_shapes_at_sizes(ToyNet)


def test_out_indices_select():
    contract.check_out_indices_select(ToyNet)


def test_frozen_stages():
    contract.check_frozen_stages(ToyNet)


def test_norm_eval():
    contract.check_norm_eval(ToyNet)


def test_with_cp_equals_plain_and_every_parameter_learns():
    torch.manual_seed(0)
    contract.check_with_cp_equals_plain(contract.build(ToyNet), torch.randn(2, 3, 64, 72))
    contract.check_with_cp_recomputes(ToyNet)


def test_channels_last_equals_nchw():
    contract.check_channels_last_equals_nchw(contract.build(ToyNet), torch.randn(2, 3, 45, 61))


def test_drop_path_schedule_from_the_table():
    model = contract.build(ToyNet, 'small', drop_path_rate=0.3)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob') else 0.0
             for s in model.stages for b in s.blocks]
    assert rates == pytest.approx([0.3 * i / 5 for i in range(6)])
    assert model.out_channels == [16, 32, 48, 64]


def test_official_checkpoint_converts_and_loads_strictly(official):
    model = contract.build(ToyNet, init_cfg=dict(type='Pretrained', checkpoint=str(official)))
    model.init_weights()
    raw = torch.load(official)['model']
    assert torch.equal(model.state_dict()['stages.2.blocks.1.conv.weight'],
                       raw['layers.2.blocks.1.conv.weight'])
    conversion = ToyNet.convert_checkpoint(raw)
    assert conversion.converted and set(conversion.dropped) == {'fc.weight', 'fc.bias'}


@pytest.mark.parametrize('wrap', contract.WRAPS)
def test_checkpoint_wrappers_load(official, wrap, tmp_path):
    contract.check_checkpoint_wrapper(lambda **kw: contract.build(ToyNet, **kw), official, wrap,
                                      tmp_path)


def test_strict_checkpoint_errors(official, tmp_path):
    contract.check_strict_checkpoint_errors(lambda **kw: contract.build(ToyNet, **kw), official,
                                            tmp_path)


def test_bad_input_and_arguments():
    contract.check_bad_input(ToyNet)
    contract.check_bad_arguments(ToyNet)


def test_registered_it_is_a_family_like_the_others():
    """Registered (as a family file's ``@MODELS.register_module()`` does), it builds from a
    config, the contract's family list includes it, and FLOPs are counted for it."""
    from mmhat.registry import MODELS
    from mmhat.utils.flops import backbone_flops
    MODELS.register_module(module=ToyNet)
    try:
        model = MODELS.build(dict(type='mmhat.ToyNet', arch='small', out_indices=(2, 3)))
        assert model.out_channels == [48, 64]
        assert ToyNet in contract.families()
        assert backbone_flops('mmhat.ToyNet', 'tiny')['gflops'] > 0
    finally:
        MODELS._module_dict.pop('ToyNet')
    assert ToyNet not in contract.families()
