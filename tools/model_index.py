"""The model zoo, machine-readable: ``model-index.yml`` and one ``configs/<family>/metafile.yml``
per backbone family, in the OpenMMLab convention (as mmdet and mmseg ship theirs), and the
generated tables of ``docs/model_zoo.md``.

    python tools/model_index.py            # write them
    python tools/model_index.py --check    # exit 1, showing what differs, when they are stale
    python tools/model_index.py --check --out-dir DIR    # the files under DIR instead

Everything is read from where the project states it once:

* the families: the backbone registry (each :class:`PyramidBackbone` in ``mmhat.registry.MODELS``)
  and the facts a family declares (``reference_name``, ``arch_zoo``, ``smallest_arch``,
  ``pretrain_size``);
* the models: every config in ``configs/det``, ``configs/seg`` and ``configs/cls``, one
  ``Models`` entry each, named by its file stem, with the backbone, checkpoint, head, data,
  schedule and metrics that the loaded config (``Config.fromfile``) has; an ImageNet
  classifier also with its whole params/FLOPs (:func:`classifier_flops`) and, as its results,
  the authors' published accuracy (``Publication.imagenet_top1``/``_top5``), marked as theirs;
* the numbers: :func:`mmhat.utils.flops.backbone_flops`, once per (type, arch);
* what is verified: the reference data that ``tests/test_backbones/test_contract.py`` holds each
  family to (a manifest of the official model per variant, an output case for the smallest).

* the paper, the authors' code and where they publish their ImageNet checkpoints: each
  family's ``publication`` (:class:`mmhat.models.backbones.base.Publication`).

Exit status: 0 written / up to date, 1 stale (``--check``), 2 a config or family the zoo cannot
describe (the message names it).
"""
import argparse
import contextlib
import difflib
import functools
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

import yaml  # noqa: E402
from mmengine.config import Config  # noqa: E402

import mmhat.models  # noqa: E402,F401  registers the families
from mmhat.models.backbones import registered_families  # noqa: E402
from mmhat.models.backbones.base import PyramidBackbone  # noqa: E402
from mmhat.registry import MODELS  # noqa: E402
from mmhat.utils.flops import backbone_flops, classifier_flops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: the folders of complete configs; every ``*.py`` in them is one model of the zoo
CONFIG_GROUPS = ('configs/det', 'configs/seg', 'configs/cls')
INDEX = 'model-index.yml'
ZOO_PAGE = 'docs/model_zoo.md'
#: decimals of the parameter (M) and GFLOP counts written
DIGITS = 3

#: the detector, segmentor or classifier, by the type that makes it one: mmdet's model type,
#: for mmseg's ``EncoderDecoder`` its decode head, mmpretrain's ``ImageClassifier``
HEADS = {'MaskRCNN': 'Mask R-CNN', 'RetinaNet': 'RetinaNet', 'FPNHead': 'Semantic FPN',
         'UPerHead': 'UperNet', 'ImageClassifier': 'official classifier'}
CLASSIFIER = HEADS['ImageClassifier']
#: (evaluator type, metric it computes) -> (task, the metric's name in OpenMMLab metafiles)
METRICS = {('CocoMetric', 'bbox'): ('Object Detection', 'box AP'),
           ('CocoMetric', 'segm'): ('Instance Segmentation', 'mask AP'),
           ('IoUMetric', 'mIoU'): ('Semantic Segmentation', 'mIoU'),
           ('Accuracy', 'top1'): ('Image Classification', 'Top 1 Accuracy'),
           ('Accuracy', 'top5'): ('Image Classification', 'Top 5 Accuracy')}
#: training sets by the ``data_root`` of the config's training dataset; ``made_by``: a toy set
#: that a tool of the repository generates (the config is a demo, not a zoo result), standing
#: in for ``stands_for``
DATASETS = {'data/coco': dict(name='COCO'),
            'data/ade/ADEChallengeData2016': dict(name='ADE20K'),
            'data/imagenet': dict(name='ImageNet-1k'),
            'data/toy_coco': dict(name='Toy shapes (COCO format)',
                                  made_by='tools/make_toy_coco.py', stands_for='COCO or ADE20K'),
            'data/toy_ade': dict(name='Toy shapes (ADE20K format)',
                                 made_by='tools/make_toy_ade.py', stands_for='COCO or ADE20K'),
            'data/toy_imagenet': dict(name='Toy shapes (ImageNet format)',
                                      made_by='tools/make_toy_imagenet.py',
                                      stands_for='ImageNet')}

#: What the backbone contract tests prove against the official models, and the test of each.
REFERENCE = 'tests/data/reference'
CONTRACT = 'tests/test_backbones/test_contract.py'
OUTPUTS_EQUAL = dict(
    Check='backbone outputs equal the official model on the reference case (float64, 1e-7)',
    Test=f'{CONTRACT}::test_equals_official_in_float64')
PARAMS_EQUAL = dict(Check='parameter count equals the official model',
                    Test=f'{CONTRACT}::test_parameters_and_keys_equal_official')
CLASSIFIERS = 'tests/cls/test_classifier.py'
LOGITS_EQUAL = dict(
    Check='classifier logits equal the official model on the reference case (float64, 1e-7)',
    Test=f'{CLASSIFIERS}::test_logits_equal_official_in_float64')
CLASSIFIER_PARAMS_EQUAL = dict(
    Check='classifier parameter count equals the official model',
    Test=f'{CLASSIFIERS}::test_config_builds_the_official_classifier')

HEADER = ('# Generated by tools/model_index.py from the configs and the backbone registry; do not '
          'edit: change those, then run it.\n')
BLOCK = re.compile(r'(<!-- model_index\.py: (?P<name>[a-z]+) -->\n).*?(<!-- /model_index\.py -->)',
                   re.S)


class ZooError(ValueError):
    """A config or family that the model index cannot describe."""


# --------------------------------------------------------------------------- reading
def families() -> List[type]:
    """The registered backbone families, in registration order (``mmhat.models.backbones``)."""
    found = registered_families()
    undocumented = [cls for cls in found if cls.publication is None]
    if undocumented:
        raise ZooError(f'registered families without a publication (class attribute '
                       f'`publication = Publication(...)`: paper, official code, where its '
                       f'checkpoints are published): '
                       f'{", ".join(f"{c.__name__} ({c.reference_name!r})" for c in undocumented)}')
    return found


def _memoized(fn):
    """``fn`` remembering, per arguments, its result or the ValueError it raised."""
    results = {}

    @functools.wraps(fn)
    def once(*args):
        if args not in results:
            try:
                results[args] = fn(*args), None
            except ValueError as e:  # mmengine's "no such model config": it falls back
                results[args] = None, e
        value, error = results[args]
        if error is not None:
            raise error
        return value

    return once


@contextlib.contextmanager
def package_lookups_once() -> Iterator[None]:
    """Within the block, mmengine's config loader looks each package and each ``mmdet::`` /
    ``mmseg::`` base up once.

    For every base it re-imports ``pkg_resources`` to ask whether the package is installed
    (~40 ms) and parses every metafile of the package (~0.4 s); the answers depend only on
    the installed files. Loading the zoo's configs takes about a third of the time this way.
    """
    import mmengine.config.config as loader
    originals = {name: getattr(loader, name)
                 for name in ('is_installed', 'get_installed_path', '_get_external_cfg_path')}
    for name, fn in originals.items():
        setattr(loader, name, _memoized(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(loader, name, fn)


@functools.lru_cache(maxsize=None)
def load_configs() -> Dict[str, Config]:
    """Every config of the zoo, loaded once: ``{'configs/det/x.py': Config}`` (do not modify)."""
    paths = sorted(p for group in CONFIG_GROUPS for p in (ROOT / group).glob('*.py'))
    with package_lookups_once():
        return {p.relative_to(ROOT).as_posix(): Config.fromfile(str(p)) for p in paths}


@functools.lru_cache(maxsize=None)
def measure(type_name: str, arch: str) -> Dict[str, Any]:
    """:func:`backbone_flops` at the family's ImageNet size, once per (type, arch)."""
    return backbone_flops(type_name, arch)


@functools.lru_cache(maxsize=None)
def measure_classifier(type_name: str, arch: str) -> Dict[str, Any]:
    """:func:`classifier_flops` (backbone and official head) at the ImageNet size."""
    return classifier_flops(type_name, arch)


def verified(cls: type, arch: str, classifier: bool = False) -> List[Dict[str, str]]:
    """The checks against the official model that the tests run for this variant: outputs
    (a classifier: logits) where the family's reference case is (its smallest variant),
    parameters where the variant's manifest is."""
    name = f'{cls.reference_name}-{arch}'
    checks = []
    cases = sorted((ROOT / REFERENCE / 'cases').glob(f'{name}_b*.pt'))
    if arch == cls.smallest_arch and cases:
        checks.append(dict(LOGITS_EQUAL if classifier else OUTPUTS_EQUAL,
                           Reference=cases[0].relative_to(ROOT).as_posix()))
    manifest = ROOT / REFERENCE / 'manifests' / f'{name}.json'
    if manifest.exists():
        checks.append(dict(CLASSIFIER_PARAMS_EQUAL if classifier else PARAMS_EQUAL,
                           Reference=manifest.relative_to(ROOT).as_posix()))
    return checks


def _innermost_dataset(cfg: Config) -> dict:
    dataset = cfg.train_dataloader.dataset
    while 'dataset' in dataset:  # RepeatDataset, ClassBalancedDataset, ...
        dataset = dataset.dataset
    return dataset


def _module_types(model: dict) -> List[str]:
    """The registered types of the model's parts, backbone first, as the config names them."""
    types = []
    for key in ('backbone', 'neck', 'rpn_head', 'roi_head', 'bbox_head', 'decode_head',
                'auxiliary_head', 'head'):
        parts = model.get(key)
        for part in parts if isinstance(parts, list) else [parts] if parts else []:
            types.append(part['type'])
    return types


def describe(path: str, cfg: Config) -> Dict[str, Any]:
    """What the zoo says about one config, read from the loaded config."""
    model, backbone = cfg.model, cfg.model.backbone
    cls = MODELS.get(backbone.type)
    if not (isinstance(cls, type) and issubclass(cls, PyramidBackbone)):
        raise ZooError(f'{path}: model.backbone.type {backbone.type!r} is not an mmhat family')
    arch = backbone.get('arch', cls.default_arch)
    if not isinstance(arch, str) or arch.lower() not in cls.arch_zoo:
        raise ZooError(f'{path}: the zoo lists official variants; model.backbone.arch is '
                       f'{arch!r}, not one of {list(cls.arch_zoo)}')
    if model.get('pretrained') or backbone.get('pretrained'):
        raise ZooError(f'{path}: a `pretrained` checkpoint; the zoo reads the backbone\'s '
                       f'init_cfg=dict(type="Pretrained", checkpoint=...)')
    init_cfg = backbone.get('init_cfg')
    checkpoint = (init_cfg.get('checkpoint') if isinstance(init_cfg, dict)
                  and init_cfg.get('type') == 'Pretrained' else None)
    head_type = model.decode_head.type if 'decode_head' in model else model.type
    if head_type not in HEADS:
        raise ZooError(f'{path}: no name for the detector/segmentor {head_type!r}; add it to '
                       f'HEADS in tools/model_index.py')
    data_root = _innermost_dataset(cfg).get('data_root', '').rstrip('/')
    if data_root not in DATASETS:
        raise ZooError(f'{path}: unknown training data_root {data_root!r}; add it to DATASETS '
                       f'in tools/model_index.py')
    results: Dict[str, List[str]] = {}
    evaluators = cfg.val_evaluator if isinstance(cfg.val_evaluator, list) else [cfg.val_evaluator]
    for evaluator in evaluators:
        names = evaluator.get('metric', evaluator.get('iou_metrics'))
        if evaluator.type == 'Accuracy':  # mmpretrain: top-k accuracies
            topk = evaluator.get('topk', (1, ))
            names = [f'top{k}' for k in ((topk, ) if isinstance(topk, int) else topk)]
        for name in [names] if isinstance(names, str) else names:
            if (evaluator.type, name) not in METRICS:
                raise ZooError(f'{path}: no task for {evaluator.type} {name!r}; add it to METRICS '
                               f'in tools/model_index.py')
            task, metric = METRICS[evaluator.type, name]
            results.setdefault(task, []).append(metric)
    train_cfg = cfg.train_cfg
    schedule = ({'Epochs': train_cfg.max_epochs} if 'max_epochs' in train_cfg else
                {'Iterations': train_cfg.max_iters})
    return dict(path=path, name=Path(path).stem, cls=cls, type=backbone.type, arch=arch.lower(),
                checkpoint=checkpoint, head=HEADS[head_type], modules=_module_types(model),
                data=DATASETS[data_root], results=results, schedule=schedule,
                optimizer=cfg.optim_wrapper.optimizer.type)


@functools.lru_cache(maxsize=None)
def zoo() -> Dict[str, List[Dict[str, Any]]]:
    """Per family (``reference_name``), its configs described, by variant then path."""
    by_family: Dict[str, List[Dict[str, Any]]] = {cls.reference_name: [] for cls in families()}
    for path, cfg in load_configs().items():
        info = describe(path, cfg)
        by_family[info['cls'].reference_name].append(info)
    for cls in families():
        order = list(cls.arch_zoo)
        by_family[cls.reference_name].sort(key=lambda i: (order.index(i['arch']), i['path']))
    return by_family


# --------------------------------------------------------------------------- metafiles
def collection_entry(cls: type) -> Dict[str, Any]:
    c = cls.publication
    return {
        'Name': c.name,
        'Metadata': {
            'Backbone Type': f'mmhat.{cls.__name__}',
            'Variants': list(cls.arch_zoo),
            'ImageNet Size': cls.pretrain_size,
            'Implementation': cls.__module__.replace('.', '/') + '.py',
            'Checkpoints Published': c.published,
        },
        'Paper': {'Title': c.paper, 'URL': c.paper_url},
        'README': ZOO_PAGE,
        'Code': {'URL': c.code, 'Version': c.commit},
    }


def model_entry(info: Dict[str, Any]) -> Dict[str, Any]:
    cls, data = info['cls'], info['data']
    flops = measure(info['type'], info['arch'])
    published = (cls.publication.published if info['checkpoint'] else
                 'none: the backbone trains from scratch (init_cfg=None)')
    metadata = {
        'Task': list(info['results']),
        'Training Data': data['name'],
        'Head': info['head'],
        'Architecture': info['modules'],
        'Training Techniques': [info['optimizer']],
        **info['schedule'],
        'Backbone': {
            'Type': info['type'],
            'Arch': info['arch'],
            'Parameters (M)': round(flops['params'], DIGITS),
            'GFLOPs': round(flops['gflops'], DIGITS),
            'FLOPs Input': flops['input'],
            'Pretrained': info['checkpoint'],
            'Pretrained Published': published,
        },
    }
    status = {'Results': 'not reproduced yet (metrics empty)',
              'Weights': 'none published', 'Verified': verified(cls, info['arch'])}
    if 'made_by' in data:
        metadata['Toy'] = True
        status['Toy'] = (f'demo config: the backbone trains from scratch, on a CPU in minutes, '
                         f'on the shapes that {data["made_by"]} generates; not a '
                         f'{data["stands_for"]} model')
    if info['head'] == CLASSIFIER:
        whole = measure_classifier(info['type'], info['arch'])
        metadata['Classifier'] = {'Parameters (M)': round(whole['params'], DIGITS),
                                  'GFLOPs': round(whole['gflops'], DIGITS),
                                  'FLOPs Input': whole['input']}
        status['Verified'] = verified(cls, info['arch'], classifier=True)
        if info['checkpoint']:
            status['Weights'] = ('the authors\' ImageNet checkpoint, backbone and head '
                                 '(Metadata.Backbone.Pretrained)')
    results = [{'Task': task, 'Dataset': data['name'], 'Metrics': dict.fromkeys(metrics)}
               for task, metrics in info['results'].items()]
    if info['head'] == CLASSIFIER and 'made_by' not in data:
        pub = cls.publication
        for result in results:
            result['Metrics'] = {
                m: (pub.imagenet_top1 if m.startswith('Top 1') else pub.imagenet_top5).get(
                    info['arch']) for m in result['Metrics']}
        status['Results'] = (f'the authors\' published accuracy of their checkpoint ('
                             f'{pub.imagenet_source}): the target to check with it '
                             f'(docs/imagenet.md), not reproduced by mmhat; null: not published')
    return {
        'Name': info['name'],
        'In Collection': cls.publication.name,
        'Config': info['path'],
        'Metadata': metadata,
        'Results': results,
        'Weights': None,
        'Status': status,
    }


def metafile_path(cls: type) -> str:
    return f'configs/{cls.reference_name}/metafile.yml'


def to_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000,
                          default_flow_style=False)


# --------------------------------------------------------------------------- the page
def _link(text: str, url: str) -> str:
    return f'[{text}]({url})'


def _verified_words(checks: List[Dict[str, str]]) -> str:
    words = {OUTPUTS_EQUAL['Check']: 'outputs (reference case)',
             PARAMS_EQUAL['Check']: 'parameters'}
    return ', '.join(words[c['Check']] for c in checks) or 'not yet'


def block_backbones() -> str:
    lines = ['| backbone | variant | ImageNet input | params (M) | GFLOPs | conv+norm GFLOPs | '
             'attention matmul GFLOPs | equal to the official model |',
             '|---|---|---|---|---|---|---|---|']
    for cls in families():
        for arch in cls.arch_zoo:
            r = measure(f'mmhat.{cls.__name__}', arch)
            lines.append(f'| `mmhat.{cls.__name__}` | {arch} | {r["input"]} | {r["params"]:.3f} | '
                         f'{r["gflops"]:.3f} | {r["conv_norm"]:.3f} | {r["attn_matmul"]:.3f} | '
                         f'{_verified_words(verified(cls, arch))} |')
    return '\n'.join(lines)


def block_checkpoints() -> str:
    lines = ['| backbone | where the authors publish the ImageNet checkpoints |', '|---|---|']
    for cls in families():
        lines.append(f'| `mmhat.{cls.__name__}` | {cls.publication.published} |')
    lines += ['', '| backbone | variant | checkpoint (`model.backbone.init_cfg.checkpoint`) | '
              'configs |', '|---|---|---|---|']
    for cls in families():
        infos = zoo()[cls.reference_name]
        for arch in cls.arch_zoo:
            used: Dict[Optional[str], int] = {}
            for info in infos:
                if info['arch'] == arch:
                    used[info['checkpoint']] = used.get(info['checkpoint'], 0) + 1
            for checkpoint, n in sorted(used.items(), key=lambda kv: (kv[0] is None, kv[0] or '')):
                shown = f'`{checkpoint}`' if checkpoint else 'none (trained from scratch)'
                lines.append(f'| `mmhat.{cls.__name__}` | {arch} | {shown} | {n} |')
    return '\n'.join(lines)


def block_configs() -> str:
    total = sum(len(infos) for infos in zoo().values())
    lines = [f'{total} configs, {len(families())} families.']
    for cls in families():
        c = cls.publication
        lines += ['', f'### {c.name}', '',
                  f'{_link(c.paper, c.paper_url)} ({c.venue}). Official code: '
                  f'{_link(c.repository.split("github.com/")[1], c.repository)} `{c.file}` at '
                  f'`{c.commit[:7]}`. Backbone `mmhat.{cls.__name__}` '
                  f'(`{collection_entry(cls)["Metadata"]["Implementation"]}`), variants '
                  f'{", ".join(f"`{a}`" for a in cls.arch_zoo)}; metafile '
                  f'`{metafile_path(cls)}`.', '',
                  '| config | variant | task | head | training data | schedule |',
                  '|---|---|---|---|---|---|']
        for info in zoo()[cls.reference_name]:
            (unit, n), = info['schedule'].items()
            schedule = f'{n} epochs' if unit == 'Epochs' else (
                f'{n // 1000}k iterations' if n % 1000 == 0 else f'{n} iterations')
            data = info['data']['name'] + ('; demo' if 'made_by' in info['data'] else '')
            config = _link(f'`{info["name"]}`', '../' + info['path'])
            lines.append(f'| {config} | {info["arch"]} | '
                         f'{", ".join(info["results"])} | {info["head"]} | {data} | {schedule} |')
    return '\n'.join(lines)


def block_example() -> str:
    first = next(info for infos in zoo().values() for info in infos
                 if 'made_by' not in info['data'])
    return '```yaml\n' + to_yaml([model_entry(first)]) + '```'


def block_classifiers() -> str:
    lines = ['| config | variant | input | params (M) | GFLOPs | authors\' top-1 (%) | '
             'authors\' top-5 (%) | equal to the official classifier |',
             '|---|---|---|---|---|---|---|---|']
    for cls in families():
        pub = cls.publication
        for info in zoo()[cls.reference_name]:
            if info['head'] != CLASSIFIER or 'made_by' in info['data']:
                continue
            r = measure_classifier(info['type'], info['arch'])
            top1, top5 = pub.imagenet_top1.get(info['arch']), pub.imagenet_top5.get(info['arch'])
            words = {LOGITS_EQUAL['Check']: 'logits (reference case)',
                     CLASSIFIER_PARAMS_EQUAL['Check']: 'parameters'}
            checks = ', '.join(words[c['Check']]
                               for c in verified(cls, info['arch'], classifier=True))
            config = _link(f'`{info["name"]}`', '../' + info['path'])
            lines.append(f'| {config} | '
                         f'{info["arch"]} | {r["input"]} | {r["params"]:.3f} | '
                         f'{r["gflops"]:.3f} | {top1 if top1 is not None else "-"} | '
                         f'{top5 if top5 is not None else "-"} | {checks or "not yet"} |')
    return '\n'.join(lines)


BLOCKS = {'backbones': block_backbones, 'checkpoints': block_checkpoints,
          'configs': block_configs, 'classifiers': block_classifiers,
          'example': block_example}


def render_page(text: str) -> str:
    """``text`` with every generated block rewritten; the prose around them is kept."""
    names = [m.group('name') for m in BLOCK.finditer(text)]
    missing = [n for n in BLOCKS if n not in names]
    unknown = [n for n in names if n not in BLOCKS]
    if missing or unknown:
        raise ZooError(f'{ZOO_PAGE}: generated blocks missing {missing}, unknown {unknown}; each '
                       f'is `<!-- model_index.py: NAME -->` ... `<!-- /model_index.py -->`')
    return BLOCK.sub(lambda m: m.group(1) + BLOCKS[m.group('name')]() + '\n' + m.group(3), text)


# --------------------------------------------------------------------------- files
def render(out_dir: Path) -> Dict[str, str]:
    """Every generated file's text, by path relative to ``out_dir``; the page's prose is the
    one in ``out_dir``."""
    files = {INDEX: HEADER + to_yaml({'Import': [metafile_path(cls) for cls in families()]})}
    for cls in families():
        files[metafile_path(cls)] = HEADER + to_yaml({
            'Collections': [collection_entry(cls)],
            'Models': [model_entry(info) for info in zoo()[cls.reference_name]]})
    page = out_dir / ZOO_PAGE
    if not page.exists():
        raise ZooError(f'{page} not found: it holds the prose around the generated tables')
    files[ZOO_PAGE] = render_page(page.read_text())
    return files


def differences(out_dir: Path, files: Dict[str, str]) -> List[str]:
    """What differs between the files under ``out_dir`` and ``files``, one message each."""
    found = []
    for rel, text in files.items():
        path = out_dir / rel
        if not path.exists():
            found.append(f'{rel}: missing')
            continue
        old = path.read_text()
        if old != text:
            diff = list(difflib.unified_diff(old.splitlines(), text.splitlines(),
                                             f'{rel} (on disk)', f'{rel} (generated)',
                                             lineterm='', n=1))
            shown = diff[:40] + ([f'... {len(diff) - 40} more diff lines'] if len(diff) > 40
                                 else [])
            found.append(f'{rel}: stale\n' + '\n'.join(shown))
    for path in sorted((out_dir / 'configs').glob('*/metafile.yml')):
        rel = path.relative_to(out_dir).as_posix()
        if rel not in files:
            found.append(f'{rel}: no family of the registry has it any more; delete it')
    return found


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--check', action='store_true',
                        help='write nothing; exit 1 and show the differences when stale')
    parser.add_argument('--out-dir', type=Path, default=ROOT,
                        help='where the generated files are (default: the repository)')
    args = parser.parse_args(argv)
    try:
        files = render(args.out_dir)
    except ZooError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.check:
        found = differences(args.out_dir, files)
        if found:
            print(f'the model index is stale ({len(found)} of {len(files)} files); run '
                  f'`python tools/model_index.py` to regenerate:\n\n' + '\n\n'.join(found))
            return 1
        print(f'the model index is up to date ({len(files)} files)')
        return 0
    for rel, text in files.items():
        path = args.out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f'wrote {rel}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
