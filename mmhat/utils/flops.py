"""Parameters and FLOPs of mmhat backbones and of whole detectors/segmentors.

What is counted (mmengine's ``FlopAnalyzer``): one fused multiply-add is one FLOP;
convolutions, linear layers, matmuls/einsums (the attention products) and norms are
counted; softmax, activations, element-wise adds and pooling are not. Attention runs on its
explicit path while counting (the fused kernel is one opaque op). Two totals are reported
because papers differ: ``gflops`` counts everything above; ``conv_norm`` leaves the
attention matmuls out, which is what the HAT-Net README's figures count.
"""
import contextlib
from typing import Any, Dict, Optional, Sequence

import torch

MATMUL_OPS = ('matmul', 'bmm', 'einsum', 'baddbmm')


@contextlib.contextmanager
def explicit_attention():
    """The explicit attention path inside the block (countable matmuls), restored after."""
    from mmhat.models.layers import set_fused_attn, use_fused_attn
    before = use_fused_attn()
    set_fused_attn(False)
    try:
        yield
    finally:
        set_fused_attn(before)


def _analyzer(model: torch.nn.Module, x: torch.Tensor):
    from mmengine.analysis import FlopAnalyzer
    analyzer = FlopAnalyzer(model, x)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    return analyzer


def model_flops(model: torch.nn.Module, hw: Sequence[int]) -> Dict[str, float]:
    """GFLOPs of one image of size ``hw`` through ``model`` (put in eval mode, on its own
    device): total, and the attention matmuls' share."""
    model.eval()  # mmdet's Swin.train() returns None: no chaining
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    with explicit_attention(), torch.no_grad():
        analyzer = _analyzer(model, torch.zeros(1, 3, *hw, device=device))
        by_op = analyzer.by_operator()
        total = analyzer.total()
    matmul = sum(v for k, v in by_op.items() if k in MATMUL_OPS)
    return dict(gflops=total / 1e9, conv_norm=(total - matmul) / 1e9, attn_matmul=matmul / 1e9)


def backbone_flops(type_name: str, arch: str, shape: Optional[Sequence[int]] = None
                   ) -> Dict[str, Any]:
    """Params (M), total GFLOPs, conv+norm GFLOPs and attention-matmul GFLOPs of a registered
    mmhat backbone, at ``shape`` (default: the family's ImageNet size, ``pretrain_size``)."""
    import mmhat.models  # noqa: F401  registers the families
    from mmhat.registry import MODELS
    cls = MODELS.get(type_name)
    if cls is None:
        raise ValueError(f'unknown backbone {type_name!r}; registered: '
                         f'{", ".join("mmhat." + n for n in sorted(MODELS.module_dict))}')
    model = MODELS.build(dict(type=type_name, arch=arch))
    h, w = shape or (cls.pretrain_size, cls.pretrain_size)
    result = model_flops(model, (h, w))
    return dict(model=f'{cls.__name__}-{arch}', input=f'{h}x{w}',
                params=sum(p.numel() for p in model.parameters()) / 1e6, **result)


def classifier_flops(type_name: str, arch: str, num_classes: int = 1000,
                     shape: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """:func:`backbone_flops` of the official ImageNet classifier: the backbone and its
    family's official head (:data:`mmhat.models.heads.OFFICIAL_HEADS`, counted as the plain
    :class:`~mmhat.models.heads.PoolLinearHead`: the same layers as the mmpretrain head)."""
    import mmhat.models  # noqa: F401  registers the families
    from mmhat.models.heads import OFFICIAL_HEADS, PoolLinearHead
    from mmhat.registry import MODELS
    cls = MODELS.get(type_name)
    if cls is None or cls.__name__ not in OFFICIAL_HEADS:
        raise ValueError(f'no official classifier for {type_name!r}; families with one: '
                         f'{", ".join("mmhat." + n for n in OFFICIAL_HEADS)}')
    backbone = MODELS.build(dict(type=type_name, arch=arch))
    head = PoolLinearHead(num_classes, backbone.out_channels[-1], **OFFICIAL_HEADS[cls.__name__])
    model = torch.nn.Sequential(backbone, head)
    h, w = shape or (cls.pretrain_size, cls.pretrain_size)
    result = model_flops(model, (h, w))
    return dict(model=f'{cls.__name__}-{arch} classifier', input=f'{h}x{w}',
                params=sum(p.numel() for p in model.parameters()) / 1e6, **result)


def config_flops(path: str, shape: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Params (M) and GFLOPs of a whole detector/segmentor at a fixed input size.

    The model's tensor forward (``_forward``: backbone, neck and heads, no post-processing
    beyond what the heads do, e.g. Mask R-CNN's RPN proposals feeding the RoI head) is
    traced with one image, as mmdet's and mmseg's own get_flops tools do. Default size:
    1280x800 for mmdet configs (``(800, 1280)``, height first), 512x512 for mmseg.
    """
    from mmengine.config import Config
    from mmengine.registry import DefaultScope, init_default_scope
    cfg = Config.fromfile(path)
    scope = cfg.get('default_scope', 'mmdet')
    init_default_scope(scope)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    cfg.model.backbone.init_cfg = None  # nothing to download: weights do not change FLOPs
    if cfg.model.get('pretrained'):
        cfg.model.pretrained = None
    if 'norm_cfg' in cfg.model.backbone and cfg.model.backbone.norm_cfg.get('type') == 'SyncBN':
        cfg.model.backbone.norm_cfg.type = 'BN'
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(cfg.model).eval()
    h, w = shape or ((800, 1280) if scope == 'mmdet' else (512, 512))
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w),
                scale_factor=(1.0, 1.0))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        sample = DetDataSample(metainfo=meta)
    else:
        from mmseg.structures import SegDataSample
        sample = SegDataSample(metainfo=meta)

    class TensorForward(torch.nn.Module):

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model._forward(x, [sample])

    with explicit_attention(), torch.no_grad():
        analyzer = _analyzer(TensorForward(model), torch.zeros(1, 3, h, w))
        total = analyzer.total()
        backbone = analyzer.by_module().get('model.backbone', 0)
    name = path.rsplit('/', 1)[-1].rsplit('.', 1)[0]
    return dict(model=name, input=f'{h}x{w}',
                params=sum(p.numel() for p in model.parameters()) / 1e6,
                gflops=total / 1e9, backbone_gflops=backbone / 1e9)
