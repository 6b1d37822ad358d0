"""The dense-prediction skeleton every mmhat backbone shares.

:class:`PyramidBackbone` owns what does not depend on the family: resolving ``arch`` against
the family's ``arch_zoo``, the constructor arguments every mmdet/mmseg backbone has
(``out_indices``, ``drop_path_rate``, ``frozen_stages``, ``norm_eval``, ``with_cp``, ...),
the drop-path schedule, ``out_channels``, the weights' memory format, input checks, the
forward loop (stem, then each stage, then the selected outputs as contiguous NCHW maps) and
loading official or mmhat checkpoints through :mod:`mmhat.checkpoint`.

A family (one file in this folder) supplies its parts and declares its facts:

* ``arch_zoo``: one row per official variant; every row has ``embed_dims`` and ``depths``;
* ``build_stem()``: the module run on the image (``(B, 3, H, W) -> (B, C, H', W')``);
* ``build_stage(i, drop_path_rates)``: stage ``i``, a :class:`PyramidStage` whose forward
  maps an NCHW map to the next (stride 4, 8, 16, 32 after stages 0-3);
* ``official_rename_rules`` / ``official_drop_rules`` (official key -> mmhat key) and
  ``legacy_rename_rules`` (earlier mmhat key -> current), applied by
  :meth:`PyramidBackbone.convert_checkpoint`;
* ``init_default_weights()``: the official random initialisation;
* facts that tests and tools read: ``pretrain_size``, ``smallest_arch``, ``base_size_arch``,
  ``fused_attention``, ``cpu_conv_kernels``, ``depthwise_kernels``, ``windowed_attention``,
  ``folded_norms``, ``cp_keeps_products``, ``default_norm_cfg``, ``default_act_cfg``,
  ``reference_name``, ``position_encoding_keys``, ``internal_padding``, and ``publication``
  (a :class:`Publication`: the paper, the authors' code and where they publish checkpoints,
  read by the model index).

A family's own constructor options (e.g. ``fused_attn``) are stored as attributes before it
calls ``super().__init__()``, which builds the network by calling the two builders.
``docs/adding_a_family.md`` walks through a complete example.
"""
import contextlib
import dataclasses
import functools
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from mmhat.models.layers.attention import (KeptAttention, set_fused_attn, use_attention_replay,
                                           use_fused_attn)
from mmhat.checkpoint import (CheckpointError, Conversion, DropRule, RenameRule,
                              check_checkpoint_source, convert_state_dict, extract_state_dict,
                              load_checkpoint_file, load_state_dict_strict)

#: Keyword arguments of mmdet's ResNet / Swin / PVT and mmseg's backbones that no mmhat
#: backbone takes: arriving here, they mean the config merged the base model's backbone dict
#: into ours (a swap without ``_delete_=True``).
FOREIGN_BACKBONE_ARGS = frozenset({
    'depth', 'num_stages', 'strides', 'dilations', 'style', 'stem_channels', 'base_channels',
    'deep_stem', 'avg_down', 'dcn', 'stage_with_dcn', 'plugins', 'zero_init_residual',
    'contract_dilation', 'multi_grid', 'norm_cfg_stem', 'window_size', 'patch_size',
    'patch_norm', 'qkv_bias', 'qk_scale', 'drop_rate', 'attn_drop_rate', 'use_abs_pos_embed',
    'convert_weights', 'mlp_ratio', 'num_layers', 'paddings', 'patch_sizes', 'use_conv_ffn',
    'pretrain_img_size', 'in_channels', 'layer_cfgs', 'out_channels', 'with_cls_token',
})


@dataclasses.dataclass(frozen=True)
class Publication:
    """Where a family comes from, as the model index (``tools/model_index.py``) states it."""
    #: the family's display name (the metafile's ``Collection``)
    name: str
    paper: str
    venue: str
    paper_url: str
    #: the official model's file at the commit read,
    #: ``https://github.com/<owner>/<repo>/blob/<40-hex sha>/<path>``
    code: str
    #: where the authors publish the ImageNet checkpoints that the configs' ``init_cfg`` names
    published: str
    #: the ImageNet-1k top-1 (%) the authors publish for each variant's checkpoint (the
    #: configs/cls/ targets; not reproduced by mmhat), and top-5 where they publish one
    imagenet_top1: Mapping[str, float] = dataclasses.field(default_factory=dict)
    imagenet_top5: Mapping[str, float] = dataclasses.field(default_factory=dict)
    #: where those numbers are published
    imagenet_source: str = ''

    def __post_init__(self):
        if not _GITHUB_BLOB.fullmatch(self.code):
            raise ValueError(f'Publication.code of {self.name} must be a GitHub file at a commit, '
                             f'https://github.com/<owner>/<repo>/blob/<40-hex sha>/<path>; got '
                             f'{self.code!r}')

    @property
    def repository(self) -> str:
        return _GITHUB_BLOB.fullmatch(self.code)['repo']

    @property
    def commit(self) -> str:
        return _GITHUB_BLOB.fullmatch(self.code)['sha']

    @property
    def file(self) -> str:
        return _GITHUB_BLOB.fullmatch(self.code)['path']


_GITHUB_BLOB = re.compile(r'(?P<repo>https://github\.com/[^/]+/[^/]+)/blob/(?P<sha>[0-9a-f]{40})/'
                          r'(?P<path>.+)')


#: The conv weight layout the families run fastest with, per device type, where
#: ``channels_last=None``: channels-last on the CPU, measured by ``tools/benchmark.py``
#: (``docs/benchmarks.md``). CUDA: not measured yet (no GPU run so far); channels-last, the
#: layout cuDNN's tensor-core convolutions take without copies in mixed precision;
#: ``tools/gpu_check.py`` measures both layouts and says which this entry should be.
CHANNELS_LAST_ON: Dict[str, bool] = {'cpu': True, 'cuda': True}


def checkpointed(module: nn.Module, *args, enabled: bool, **kwargs):
    """``module(*args, **kwargs)``, with activation checkpointing when ``enabled`` and a
    gradient is needed (the input or one of the module's parameters requires one).

    A BatchNorm inside the module sees the forward twice in training mode; the recomputation
    runs under :func:`frozen_bn_stats`, so the running statistics take exactly one step per
    iteration (mmcv's ResNet takes two).
    """
    x = args[0]
    if (enabled and torch.is_grad_enabled() and not isinstance(module, nn.Identity)
            and (x.requires_grad or any(p.requires_grad for p in module.parameters()))):
        return checkpoint(module, *args, use_reentrant=False,
                          context_fn=functools.partial(_checkpoint_contexts, module), **kwargs)
    return module(*args, **kwargs)


class PyramidStage(nn.Module):
    """A stage: ``patch_embed`` (the stage entry: downsampling or patch merging; ``Identity``
    where there is none), then ``blocks``; a family adds what else its stage has and writes
    :meth:`forward` from NCHW map to NCHW map.

    Every submodule call goes through :meth:`run`, which checkpoints it when the backbone's
    ``with_cp`` is on (the backbone sets :attr:`with_cp` on its stages) and the stage trains.
    """

    def __init__(self, patch_embed: nn.Module, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.blocks = nn.ModuleList(blocks)
        self.with_cp = False

    def run(self, module: nn.Module, *args, **kwargs):
        """``module(*args, **kwargs)``, checkpointed when ``with_cp`` and training."""
        return checkpointed(module, *args, enabled=self.with_cp and self.training, **kwargs)

    def run_blocks(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Every block in order: ``x = block(x, *args, **kwargs)``."""
        for block in self.blocks:
            x = self.run(block, x, *args, **kwargs)
        return x


class PyramidBackbone(BaseModule):
    """Base of the families: a stem and ``len(depths)`` stages with strides 4, 8, 16, 32.

    Args:
        arch: a name from ``arch_zoo`` or a dict with every key of its rows; None: the
            family's ``default_arch``.
        out_indices: stages whose outputs ``forward`` returns (NCHW, in order).
        drop_path_rate: stochastic depth, rising linearly over all blocks to this value.
        norm_cfg: the family's norm layers (None: ``default_norm_cfg``, the paper's).
        act_cfg: the family's activations (None: ``default_act_cfg``, the paper's).
        frozen_stages: -1 freezes nothing; ``k >= 0`` freezes the stem and stages
            ``0..k-1`` (parameters fixed, modules kept in eval mode), as mmdet's ResNet/Swin.
        norm_eval: keep every BatchNorm in eval mode during training (frozen statistics).
        with_cp: activation checkpointing of the stem, every stage entry and every block
            (less memory, slower backward).
        channels_last: store conv weights channels-last (NHWC strides; the state dict is the
            same); None (default): the layout :data:`CHANNELS_LAST_ON` gives for the device
            type the model is on, followed again whenever the model moves to another device
            type (``.to('cuda')``). Measured faster on CPU for every family, because the
            token families hand their convolutions NHWC views of ``(B, N, C)`` tokens and
            oneDNN copied them to NCHW for NCHW weights (``docs/benchmarks.md``).
            True / False fix the layout; ``model.to(memory_format=...)`` changes it later.
        pretrained: deprecated alias of ``init_cfg=dict(type='Pretrained', checkpoint=...)``
            (mmseg's ``EncoderDecoder`` injects it).
        init_cfg: mmengine init config; ``type='Pretrained'`` loads official or mmhat
            checkpoints (converted on the fly, strictly, see :meth:`load_pretrained`).
    """
    #: variant name -> architecture settings; every row has every key of the first row.
    arch_zoo: Dict[str, Dict[str, Any]] = {}
    #: the variant built when ``arch`` is not given
    default_arch: str = 'small'
    #: the smallest official variant (the one with a reference case, used by quick checks)
    smallest_arch: str = 'tiny'
    #: the variant of 40-50 M parameters (the size of Swin-S, PVT-M)
    base_size_arch: str = 'base'
    #: the ImageNet resolution of the official checkpoints
    pretrain_size: int = 224
    #: whether the family's attention is softmax attention with a fused (SDPA) path next to
    #: the explicit one (``fused_attn`` argument, :func:`mmhat.models.layers.set_fused_attn`)
    fused_attention: bool = False
    #: whether the family builds ``layers.PointwiseConv2d`` / ``DepthwiseConv2d`` (CPU training
    #: kernels that ``layers.set_cpu_kernels(False)`` turns back into plain ``nn.Conv2d``)
    cpu_conv_kernels: bool = False
    #: whether the family convolves with depthwise kernels given as tensors through
    #: ``layers.depthwise_conv2d`` (a k >= 5 weight gradient from 3x3 ones; with
    #: ``layers.set_cpu_kernels(False)``: ``F.conv2d``)
    depthwise_kernels: bool = False
    #: whether some stage attends inside windows (``layers.window_attention``), whose cells
    #: are cut and merged in one copy each way unless ``layers.set_window_copies(False)``
    windowed_attention: bool = False
    #: whether a training-mode BatchNorm follows an expanding ``layers.PointwiseConv2d``
    #: (``layers.pointwise_then_norm`` folds it into the conv unless
    #: ``layers.set_norm_fold(False)``)
    folded_norms: bool = False
    #: whether ``with_cp`` keeps some linear products of the forward for the recomputation
    #: (``layers.kept_linear``; ``layers.set_attention_replay(False)`` turns it off with the
    #: attention replay)
    cp_keeps_products: bool = False
    #: whether some stage pads its maps at sizes that are not multiples of its windows or
    #: merge strides (tracing freezes whether each pad happens: ONNX dynamic sizes)
    internal_padding: bool = False
    #: ``norm_cfg`` / ``act_cfg`` when not given: the paper's
    default_norm_cfg: Dict[str, Any] = dict(type='BN')
    default_act_cfg: Dict[str, Any] = dict(type='GELU')
    #: the family's name in ``tests/data/reference`` (manifests ``<name>-<arch>.json``) and in
    #: config file names (``maskrcnn_<name>_<letter>_coco.py``)
    reference_name: str = ''
    #: name fragments of the family's position-encoding parameters, which the configs exempt
    #: from weight decay (``paramwise_cfg.custom_keys``)
    position_encoding_keys: Tuple[str, ...] = ()
    #: the paper and the official code (None: not documented; the model index refuses it)
    publication: Optional[Publication] = None
    #: image channels; the stems are built for RGB, as the official checkpoints
    in_channels: int = 3
    #: the smallest input side the network takes
    min_input_size: int = 32

    def __init__(self,
                 arch: Union[str, dict, None] = None,
                 *,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_path_rate: float = 0.0,
                 norm_cfg: Optional[dict] = None,
                 act_cfg: Optional[dict] = None,
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 channels_last: Optional[bool] = None,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[Union[dict, list]] = None,
                 **unknown: Any) -> None:
        if unknown:
            raise TypeError(self._unknown_arguments_message(unknown))
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError(
                    f'mmhat.{type(self).__name__} got both pretrained={pretrained!r} and '
                    f'init_cfg={init_cfg!r}. mmseg\'s base configs set model.pretrained (an '
                    f'ImageNet ResNet), which the segmentor passes on to the backbone: set '
                    f'model.pretrained=None and keep the backbone\'s init_cfg.')
            warnings.warn('`pretrained` is deprecated, use init_cfg=dict(type="Pretrained", '
                          'checkpoint=...)')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        arch = self.default_arch if arch is None else arch
        self.arch_name = arch.lower() if isinstance(arch, str) else 'custom'
        self.arch_settings = self.resolve_arch(arch)
        depths = self.arch_settings['depths']
        self.num_stages = len(depths)
        self.out_indices = self._check_out_indices(out_indices, self.num_stages)
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'frozen_stages must be an int in [-1, {self.num_stages}] '
                             f'(-1: train everything), got {frozen_stages!r}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.norm_cfg = dict(norm_cfg if norm_cfg is not None else self.default_norm_cfg)
        self.act_cfg = dict(act_cfg if act_cfg is not None else self.default_act_cfg)
        self.out_channels = [self.arch_settings['embed_dims'][i] for i in self.out_indices]

        self.stem = self.build_stem()
        rates = drop_path_schedule(drop_path_rate, depths)
        self.stages = nn.ModuleList(self.build_stage(i, rates[i]) for i in range(self.num_stages))
        self.with_cp = with_cp
        self.channels_last = channels_last
        self._layout_device: Optional[str] = None
        if channels_last is None:
            self._follow_device_layout()
        elif channels_last:
            self.to(memory_format=torch.channels_last)

    # ---------------------------------------------------------------- the family's parts
    def build_stem(self) -> nn.Module:
        """The module run on the image, before stage 0."""
        raise NotImplementedError(f'{type(self).__name__} must define build_stem()')

    def build_stage(self, i: int, drop_path_rates: List[float]) -> PyramidStage:
        """Stage ``i``; ``drop_path_rates`` has one rate per block of the stage."""
        raise NotImplementedError(f'{type(self).__name__} must define build_stage(i, rates)')

    def init_default_weights(self) -> None:
        """The official random initialisation of the family."""

    # ---------------------------------------------------------------- configuration
    @classmethod
    def arch_keys(cls) -> Tuple[str, ...]:
        """The keys every ``arch`` dict must have (those of the zoo's rows)."""
        first = next(iter(cls.arch_zoo.values()))
        return tuple(first)

    @classmethod
    def resolve_arch(cls, arch: Union[str, dict]) -> Dict[str, Any]:
        """Look ``arch`` up in ``arch_zoo`` or check a custom dict; clear errors otherwise."""
        names = ', '.join(repr(n) for n in cls.arch_zoo)
        keys = cls.arch_keys()
        if isinstance(arch, str):
            if arch.lower() not in cls.arch_zoo:
                raise ValueError(f'unknown arch {arch!r} for {cls.__name__}; valid names: '
                                 f'{names}, or a dict with keys {list(keys)}')
            return dict(cls.arch_zoo[arch.lower()])
        if isinstance(arch, dict):
            missing = [k for k in keys if k not in arch]
            if missing:
                raise ValueError(f'{cls.__name__} arch dict is missing {missing}; it needs '
                                 f'{list(keys)} (or use one of the names {names})')
            extra = [k for k in arch if k not in keys]
            if extra:
                raise ValueError(f'{cls.__name__} arch dict has unknown keys {extra}; valid '
                                 f'keys: {list(keys)}')
            lengths = {k: len(v) for k, v in arch.items() if isinstance(v, (list, tuple))}
            if len(set(lengths.values())) > 1:
                raise ValueError(f'{cls.__name__} arch dict: per-stage lists differ in length '
                                 f'{lengths}')
            return dict(arch)
        raise TypeError(f'arch must be a name ({names}) or a dict, got {type(arch).__name__}')

    @classmethod
    def _unknown_arguments_message(cls, unknown: Dict[str, Any]) -> str:
        names = sorted(unknown)
        foreign = [n for n in names if n in FOREIGN_BACKBONE_ARGS]
        if foreign:
            return (f'mmhat.{cls.__name__} got the arguments {foreign} of another backbone '
                    f'(ResNet/Swin/PVT-style): the config merged the base model\'s backbone '
                    f'dict into this one. Add _delete_=True to the backbone dict, e.g. '
                    f"backbone=dict(_delete_=True, type='mmhat.{cls.__name__}', "
                    f"arch='{cls.default_arch}', ...), so that it replaces the base's backbone.")
        in_arch = [n for n in names if n in cls.arch_keys()]
        if in_arch:
            return (f'mmhat.{cls.__name__}: {in_arch} belong inside `arch`: give a variant name '
                    f'({", ".join(map(repr, cls.arch_zoo))}) or a dict with every key '
                    f'{list(cls.arch_keys())}, e.g. arch=dict(<the {cls.default_arch!r} row of '
                    f'mmhat.{cls.__name__}.arch_zoo>, {in_arch[0]}=...)')
        return (f'mmhat.{cls.__name__} got unexpected arguments {names}; it takes arch (one of '
                f'{", ".join(map(repr, cls.arch_zoo))}, or a dict with keys '
                f'{list(cls.arch_keys())}) and the options in its docstring')

    @staticmethod
    def _check_out_indices(out_indices: Sequence[int], num_stages: int) -> Tuple[int, ...]:
        if isinstance(out_indices, int):
            out_indices = (out_indices, )
        out_indices = tuple(out_indices)
        bad = [i for i in out_indices if not isinstance(i, int) or not 0 <= i < num_stages]
        if not out_indices or bad:
            raise ValueError(f'out_indices must be stage indices in [0, {num_stages - 1}], got '
                             f'{out_indices!r}')
        if list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f'out_indices must be increasing and unique, got {out_indices!r}')
        return out_indices

    @classmethod
    def stage_size(cls, size: int, i: int) -> int:
        """Rows (or columns) of stage ``i``'s map for an input side ``size``: the conv chain's
        ``ceil(size / 4)``, then halving with ceil, i.e. ``ceil(size / 2 ** (i + 2))``."""
        return -(-size // 2**(i + 2))

    # ---------------------------------------------------------------- forward
    @property
    def with_cp(self) -> bool:
        """Activation checkpointing of the stem, every stage entry and every block."""
        return self._with_cp

    @with_cp.setter
    def with_cp(self, enabled: bool) -> None:
        self._with_cp = bool(enabled)
        for stage in self.stages:
            stage.with_cp = self._with_cp

    def forward(self, x: torch.Tensor, **kwargs) -> Tuple[torch.Tensor, ...]:
        """``(B, 3, H, W)`` -> tuple of contiguous NCHW maps for ``out_indices``; stage ``i``
        has ``embed_dims[i]`` channels and :meth:`stage_size` rows and columns.

        Keyword arguments are the family's (see :meth:`forward_extras`).
        """
        self.check_input(x)
        extras = self.forward_extras(x, **kwargs)
        x = checkpointed(self.stem, x, enabled=self.with_cp and self.training, **extras)
        outs = []
        for i, stage in enumerate(self.stages[:self.out_indices[-1] + 1]):
            x = stage(x, **extras)  # (B, C_i, H_i, W_i)
            if i in self.out_indices:
                # Contiguous NCHW: inside, maps may be channels-last views, and not every head
                # honours strides (mmcv's CPU RoIAlign reads contiguous NCHW: fed channels-last
                # maps, the toy Mask R-CNN learned nothing).
                outs.append(x.contiguous())
        return tuple(outs)

    def forward_extras(self, x: torch.Tensor, **kwargs) -> Dict[str, Any]:
        """A family's extra forward arguments, checked once and passed to the stem and every
        stage; the base takes none."""
        if kwargs:
            raise TypeError(f'{type(self).__name__}.forward() takes no keyword arguments, got '
                            f'{sorted(kwargs)}')
        return {}

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for inputs the network cannot take."""
        name, side = type(self).__name__, self.min_input_size
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'{name} expects a 4-D (B, C, H, W) tensor, got {shape}')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'{name} expects {self.in_channels} input channels (RGB), got '
                             f'{x.shape[1]} in an input of shape {tuple(x.shape)}')
        if x.shape[2] < side or x.shape[3] < side:
            raise ValueError(f'{name} needs inputs of at least {side}x{side} pixels, got '
                             f'{x.shape[2]}x{x.shape[3]}; resize or pad the image')

    # ---------------------------------------------------------------- memory format
    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.cuda()``, ... as usual; with ``channels_last=None`` the weights then
        take the layout of the device type they moved to."""
        super()._apply(fn, recurse)
        if getattr(self, 'channels_last', False) is None:
            self._follow_device_layout()
        return self

    def _follow_device_layout(self) -> None:
        weight = next((m.weight for m in self.modules() if isinstance(m, nn.Conv2d)), None)
        if weight is None or weight.device.type == self._layout_device:
            return  # the same device type: a layout the user set stays
        self._layout_device = weight.device.type
        fmt = (torch.channels_last if CHANNELS_LAST_ON.get(weight.device.type, True) else
               torch.contiguous_format)
        nn.Module._apply(self, lambda t: t.to(memory_format=fmt) if t.dim() == 4 else t)

    # ---------------------------------------------------------------- training state
    def _frozen_modules(self) -> Sequence[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.stem] + [self.stages[i] for i in range(self.frozen_stages)]

    def train(self, mode: bool = True) -> 'PyramidBackbone':
        """Train mode, except frozen stages and (with ``norm_eval``) every BatchNorm."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    # ---------------------------------------------------------------- weights
    #: official key -> mmhat key, ``(regex, replacement)`` applied in order to every key
    official_rename_rules: Sequence[RenameRule] = ()
    #: official keys the backbone does not use, ``(regex, reason)``; dropped and reported
    official_drop_rules: Sequence[DropRule] = ()
    #: the official classifier's keys -> :class:`mmhat.models.heads.OfficialClsHead`'s
    #: (``(regex, replacement)``; only keys that match are the head's): every official key is
    #: the backbone's, the head's or dropped by ``official_drop_rules`` as unused
    official_head_rules: Sequence[RenameRule] = ()
    #: key names of earlier mmhat releases -> today's, applied to mmhat checkpoints
    legacy_rename_rules: Sequence[RenameRule] = ()
    #: keys under these prefixes mean the checkpoint is already in mmhat format
    native_prefixes: Tuple[str, ...] = ('stem.', 'stages.')

    @classmethod
    def official_rules(cls, state_dict: Dict[str, torch.Tensor]) -> Sequence[RenameRule]:
        """The rename rules for this checkpoint (a family may derive one from its keys)."""
        return cls.official_rename_rules

    @classmethod
    def convert_checkpoint(cls, state_dict: Dict[str, torch.Tensor]) -> Conversion:
        """Official or earlier-mmhat keys -> today's mmhat keys, a pure function."""
        return convert_state_dict(state_dict, cls.official_rules(state_dict),
                                  cls.official_drop_rules, cls.native_prefixes,
                                  cls.legacy_rename_rules)

    def init_weights(self) -> None:
        """Load ``init_cfg=dict(type='Pretrained', ...)`` ourselves, else the default init.

        mmengine's ``Pretrained`` only unwraps ``state_dict`` and loads non-strictly, which
        silently loads nothing from an official ``{'model': ...}`` file.
        """
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            self.load_pretrained(cfg['checkpoint'], prefix=cfg.get('prefix'))
            self._is_init = True
            return
        self.init_default_weights()
        if cfg is None:
            # mmengine's BaseModule.init_weights would only log every parameter as
            # unchanged; there is nothing else to initialise.
            self._is_init = True
            return
        super().init_weights()

    def load_pretrained(self, filename: str, prefix: Optional[str] = None) -> Conversion:
        """Load an official or mmhat checkpoint strictly, reporting what was dropped.

        Raises:
            CheckpointError: another model's zoo (``open-mmlab://``, ``torchvision://``, ...,
                refused before any download), a failed download, a missing/corrupt/unsafe
                file, or keys that do not fit (those of another model named as such).
        """
        check_checkpoint_source(filename, f'mmhat.{type(self).__name__}')
        sd = extract_state_dict(load_checkpoint_file(filename), prefix=prefix)
        conversion = self.convert_checkpoint(sd)
        hint = (f'Is this a checkpoint of {type(self).__name__} arch={self.arch_name!r}? '
                f'Official checkpoints of another family or variant do not fit; pick the '
                f'matching `arch` or checkpoint.')
        load_state_dict_strict(self, conversion.state_dict, source=filename, hint=hint)
        kind = 'official' if conversion.converted else 'mmhat'
        print_log(f'{type(self).__name__}: loaded {len(conversion.state_dict)} tensors from '
                  f'{kind} checkpoint {filename}', logger='current')
        if conversion.legacy_renamed:
            print_log(f'  renamed {len(conversion.legacy_renamed)} keys of an earlier mmhat '
                      f'layout', logger='current')
        reasons: Dict[str, list] = {}
        for key, why in conversion.dropped.items():
            reasons.setdefault(why, []).append(key)
        for why, keys in reasons.items():
            print_log(f'  dropped {len(keys)} keys ({why}): {", ".join(keys[:4])}'
                      f'{", ..." if len(keys) > 4 else ""}', logger='current')
        return conversion


def drop_path_schedule(rate: float, depths: Sequence[int]) -> List[List[float]]:
    """Stochastic-depth rates rising linearly from 0 over all blocks to ``rate``, split per
    stage: ``[[r_0, ...], [...], ...]`` with ``depths[i]`` rates in stage ``i``."""
    rates = torch.linspace(0, rate, sum(depths)).tolist()
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [rates[start:start + depth] for start, depth in zip(starts, depths)]


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module):
    """Batch norms inside ``module`` normalise with batch statistics as usual but leave
    their running statistics (and ``num_batches_tracked``) as they were."""
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in module.modules()
             if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    try:
        for m, _, _ in saved:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def _checkpoint_contexts(block: nn.Module):
    """``context_fn`` of :func:`torch.utils.checkpoint.checkpoint` (called in the forward):
    around the forward, a :class:`~mmhat.models.layers.attention.KeptAttention` that keeps the
    fused attention's tensors; around the recomputation in the backward, the same replaying
    them (the recomputation runs no attention kernel), :func:`frozen_bn_stats` and the
    attention path the forward took, so that a :func:`~mmhat.models.layers.set_fused_attn`
    between forward and backward cannot make the recomputation differ (torch refuses it:
    "Recomputed values ... have different metadata")."""
    kept = KeptAttention() if use_attention_replay() else None
    return (kept.forward() if kept else contextlib.nullcontext(),
            _recomputation(block, use_fused_attn(), kept))


@contextlib.contextmanager
def _recomputation(block: nn.Module, fused: bool, kept: Optional[KeptAttention]):
    before = use_fused_attn()
    set_fused_attn(fused)
    try:
        with frozen_bn_stats(block), kept.recomputation() if kept else contextlib.nullcontext():
            yield
    finally:
        set_fused_attn(before)


__all__ = ['CHANNELS_LAST_ON', 'PyramidBackbone', 'PyramidStage', 'CheckpointError',
           'checkpointed', 'drop_path_schedule']
