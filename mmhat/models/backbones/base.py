"""The dense-prediction contract every mmhat backbone shares.

:class:`PyramidBackbone` holds what does not depend on the family: resolving ``arch``
against the family's ``arch_zoo``, validating ``out_indices`` / ``frozen_stages``,
freezing, ``norm_eval``, activation checkpointing, input checks, and loading official
checkpoints through :mod:`mmhat.checkpoint`. A family defines ``self.stem`` (module run
before stage 0) and ``self.stages`` (one module per stage, holding everything frozen with
that stage), its ``arch_zoo``, and the tables ``official_rename_rules`` /
``official_drop_rules`` that :meth:`PyramidBackbone.convert_checkpoint` applies to official
checkpoints.
"""
import contextlib
import functools
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from mmhat.checkpoint import (CheckpointError, Conversion, DropRule, RenameRule,
                              convert_state_dict, extract_state_dict, load_checkpoint_file,
                              load_state_dict_strict)


class PyramidBackbone(BaseModule):
    """Base of the four families: a stem and ``num_stages`` stages with strides 4..32.

    Inside, maps are channels-last and so are the conv weights (:meth:`use_channels_last`);
    ``forward`` returns contiguous NCHW maps (:meth:`output_map`).

    Args:
        arch: a name from ``arch_zoo`` or a dict with every key of ``arch_keys``.
        out_indices: stages whose outputs ``forward`` returns (NCHW, in order).
        frozen_stages: -1 freezes nothing; ``k >= 0`` freezes the stem and stages
            ``0..k-1`` (parameters fixed, modules kept in eval mode), as mmdet's ResNet/Swin.
        norm_eval: keep every BatchNorm in eval mode during training (frozen statistics).
        with_cp: activation checkpointing per block (less memory, slower backward).
        pretrained: deprecated alias of ``init_cfg=dict(type='Pretrained', checkpoint=...)``
            (mmseg's ``EncoderDecoder`` injects it).
        init_cfg: mmengine init config; ``type='Pretrained'`` loads official or mmhat
            checkpoints (converted on the fly, strictly, see :meth:`load_pretrained`).
    """
    #: variant name -> architecture settings; every row has every key of ``arch_keys``.
    arch_zoo: Dict[str, Dict[str, Any]] = {}
    #: the official input channels; the stems are built for RGB.
    in_channels: int = 3

    def __init__(self,
                 arch: Union[str, dict],
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[Union[dict, list]] = None) -> None:
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('give either `pretrained` or `init_cfg`, not both')
            warnings.warn('`pretrained` is deprecated, use init_cfg=dict(type="Pretrained", '
                          'checkpoint=...)')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        self.arch_name = arch if isinstance(arch, str) else 'custom'
        self.arch_settings = self.resolve_arch(arch)
        self.num_stages = len(self.arch_settings['depths'])
        self.out_indices = self._check_out_indices(out_indices, self.num_stages)
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'frozen_stages must be an int in [-1, {self.num_stages}] '
                             f'(-1: train everything), got {frozen_stages!r}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp

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

    # ---------------------------------------------------------------- training state
    def _frozen_modules(self) -> Sequence[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.stem] + [self.stages[i] for i in range(self.frozen_stages)]

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'PyramidBackbone':
        """Train mode, except frozen stages and (with ``norm_eval``) every BatchNorm."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def run_block(self, block: nn.Module, x: torch.Tensor, *args):
        """Run one block (or stem, or patch embedding), with activation checkpointing when
        ``with_cp``, training, and something in it needs a gradient.

        The stems and patch embeddings go through here too: at stride 2 and 4 their
        activations are among the largest of the network (Shunted-T at 800x1216: the
        training peak with ``with_cp`` falls from 0.75x to 0.71x of the plain one). As in
        mmcv's ResNet, a BatchNorm inside a checkpointed module sees the forward twice in
        training mode; the recomputation runs under :func:`frozen_bn_stats`, so the running
        statistics still take exactly one step per iteration (mmcv's ResNet takes two).
        """
        if isinstance(block, nn.Identity):
            return x
        if (self.with_cp and self.training and torch.is_grad_enabled()
                and (x.requires_grad or any(p.requires_grad for p in block.parameters()))):
            return checkpoint(block, x, *args, use_reentrant=False,
                              context_fn=functools.partial(_checkpoint_contexts, block))
        return block(x, *args)

    def use_channels_last(self) -> None:
        """Store every conv weight channels-last (NHWC strides); families call it last in
        ``__init__``, before anything (DDP, an optimizer) holds the parameters.

        The token families (Shunted, GroupMixFormer) keep their maps as ``(B, N, C)``
        tokens, i.e. NHWC memory, and hand their convolutions channels-last views. With
        NCHW weights the CPU (oneDNN) convolution first copies such an input to NCHW, a
        transposition that cost more than the convolution itself (Shunted-T's stage-1
        depthwise conv at 800x1216: 457 ms, against 14 ms with a channels-last weight).
        With channels-last weights every convolution runs in NHWC and takes the views as
        they are. The weights keep their shapes and state-dict layout: loading, saving and
        optimizers see no difference.
        ``model.to(memory_format=torch.contiguous_format)`` restores NCHW weights (the
        benchmark's reference rows).
        """
        self.to(memory_format=torch.channels_last)

    @staticmethod
    def output_map(x: torch.Tensor) -> torch.Tensor:
        """A stage output as the heads get it: contiguous NCHW memory.

        The maps are channels-last inside the backbone, but not every consumer honours
        strides: mmcv's CPU RoIAlign reads its input as contiguous NCHW, so Mask R-CNN fed
        channels-last maps (an FPN keeps the layout) silently pooled the wrong pixels and
        learned nothing (toy bbox mAP 0.000). One copy per output (about 2% of a forward
        at 800x1216) makes every head safe, as mmdet's Swin and PVT do.
        """
        return x.contiguous()

    def check_input(self, x: torch.Tensor, min_size: int = 32) -> None:
        """Raise a clear error for inputs the network cannot take."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'{type(self).__name__} expects a 4-D (B, C, H, W) tensor, got '
                             f'{shape}')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'{type(self).__name__} expects {self.in_channels} input channels '
                             f'(RGB), got {x.shape[1]} in an input of shape {tuple(x.shape)}')
        if x.shape[2] < min_size or x.shape[3] < min_size:
            raise ValueError(f'{type(self).__name__} needs inputs of at least {min_size}x'
                             f'{min_size} pixels, got {x.shape[2]}x{x.shape[3]}; resize or pad '
                             f'the image')

    # ---------------------------------------------------------------- weights
    #: official key -> mmhat key, ``(regex, replacement)`` applied in order to every key
    official_rename_rules: Sequence[RenameRule] = ()
    #: official keys the backbone does not use, ``(regex, reason)``; dropped and reported
    official_drop_rules: Sequence[DropRule] = ()
    #: keys under these prefixes mean the checkpoint is already in mmhat format
    native_prefixes: Tuple[str, ...] = ('stem.', 'stages.')

    @classmethod
    def official_rules(cls, state_dict: Dict[str, torch.Tensor]) -> Sequence[RenameRule]:
        """The rename rules for this checkpoint (a family may derive one from its keys)."""
        return cls.official_rename_rules

    @classmethod
    def convert_checkpoint(cls, state_dict: Dict[str, torch.Tensor]) -> Conversion:
        """Official -> mmhat keys of the family, a pure function (unchanged if already mmhat)."""
        return convert_state_dict(state_dict, cls.official_rules(state_dict),
                                  cls.official_drop_rules, cls.native_prefixes)

    def init_default_weights(self) -> None:
        """The official random initialisation of the family."""

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
            CheckpointError: missing/corrupt/unsafe file, or keys that do not fit.
        """
        sd = extract_state_dict(load_checkpoint_file(filename), prefix=prefix)
        conversion = self.convert_checkpoint(sd)
        hint = (f'Is this a checkpoint of {type(self).__name__} arch={self.arch_name!r}? '
                f'Official checkpoints of another family or variant do not fit; pick the '
                f'matching `arch` or checkpoint.')
        load_state_dict_strict(self, conversion.state_dict, source=filename, hint=hint)
        kind = 'official' if conversion.converted else 'mmhat'
        print_log(f'{type(self).__name__}: loaded {len(conversion.state_dict)} tensors from '
                  f'{kind} checkpoint {filename}', logger='current')
        if conversion.dropped:
            reasons: Dict[str, list] = {}
            for key, why in conversion.dropped.items():
                reasons.setdefault(why, []).append(key)
            for why, keys in reasons.items():
                print_log(f'  dropped {len(keys)} keys ({why}): {", ".join(keys[:4])}'
                          f'{", ..." if len(keys) > 4 else ""}', logger='current')
        return conversion


__all__ = ['PyramidBackbone', 'CheckpointError']


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
    """``context_fn`` of :func:`torch.utils.checkpoint.checkpoint`: nothing around the
    forward, :func:`frozen_bn_stats` around the recomputation in the backward."""
    return contextlib.nullcontext(), frozen_bn_stats(block)
