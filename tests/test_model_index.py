"""The machine-readable model zoo (``model-index.yml``, ``configs/<family>/metafile.yml`` and the
generated tables of ``docs/model_zoo.md``) against what it describes: every config listed once,
each entry as its config says, the numbers as the FLOP counter measures them, the verified
claims backed by the contract tests, and the committed files as ``tools/model_index.py`` writes
them. Each config is loaded and each (type, arch) measured once, by the tool's caches."""
import collections
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

import backbone_contract as contract
import reference as R
from tool_module import load_tool
from mmhat.models.backbones.base import PyramidBackbone
from mmhat.registry import MODELS

ROOT = Path(__file__).parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix()
                 for group in ('det', 'seg', 'cls') for p in (ROOT / 'configs' / group).glob('*.py'))


TOOL = load_tool('model_index')  # one instance: its loaded configs and measurements serve every test here


@pytest.fixture(scope='module')
def index():
    """The committed files, parsed: the imported metafiles, every collection and model."""
    imports = yaml.safe_load((ROOT / 'model-index.yml').read_text())['Import']
    metafiles = {path: yaml.safe_load((ROOT / path).read_text()) for path in imports}
    return dict(imports=imports, metafiles=metafiles,
                collections=[c for m in metafiles.values() for c in m['Collections']],
                models=[e for m in metafiles.values() for e in m['Models']])


@pytest.fixture(scope='module')
def entries(index):
    return {e['Config']: e for e in index['models']}


def test_one_metafile_per_family(index):
    families = contract.families()
    assert sorted(index['imports']) == sorted(f'configs/{cls.reference_name}/metafile.yml'
                                              for cls in families)
    for path, metafile in index['metafiles'].items():
        (collection, ) = metafile['Collections']
        cls = MODELS.get(collection['Metadata']['Backbone Type'])
        assert path == f'configs/{cls.reference_name}/metafile.yml'
        assert collection['Metadata']['Variants'] == list(cls.arch_zoo)
        assert collection['Metadata']['ImageNet Size'] == cls.pretrain_size
        assert (ROOT / collection['Metadata']['Implementation']).is_file()
        assert (ROOT / collection['README']).is_file()
        assert collection['Paper']['URL'].startswith('https://arxiv.org/abs/')
        assert collection['Code']['URL'].startswith('https://github.com/')
        assert collection['Code']['Version'] in collection['Code']['URL']


def test_every_config_is_listed_exactly_once(index):
    listed = collections.Counter(e['Config'] for e in index['models'])
    assert CONFIGS and sorted(listed) == CONFIGS
    assert [c for c, n in listed.items() if n > 1] == []
    names = collections.Counter(e['Name'] for e in index['models'])
    assert [n for n, k in names.items() if k > 1] == []
    for e in index['models']:
        assert (ROOT / e['Config']).is_file() and e['Name'] == Path(e['Config']).stem


def test_in_collection_exists_and_is_the_backbones_family(index):
    families = {c['Name']: c['Metadata']['Backbone Type'] for c in index['collections']}
    for metafile in index['metafiles'].values():
        (collection, ) = metafile['Collections']
        for e in metafile['Models']:
            assert e['In Collection'] == collection['Name'] and e['In Collection'] in families
            assert e['Metadata']['Backbone']['Type'] == collection['Metadata']['Backbone Type']


@pytest.mark.parametrize('path', CONFIGS, ids=[Path(p).stem for p in CONFIGS])
def test_entry_is_what_its_config_says(entries, path):
    cfg = TOOL.load_configs()[path]
    entry, backbone = entries[path], cfg.model.backbone
    meta = entry['Metadata']
    assert meta['Backbone']['Type'] == backbone.type
    assert meta['Backbone']['Arch'] == backbone.arch
    init_cfg = backbone.get('init_cfg')
    assert meta['Backbone']['Pretrained'] == (init_cfg.checkpoint if init_cfg else None)
    toy = 'toy' in cfg.train_dataloader.dataset.data_root
    assert meta.get('Toy', False) == toy and ('Toy' in entry['Status']) == toy
    assert ('Toy' in meta['Training Data']) == toy
    assert meta['Head'] in ('Mask R-CNN', 'RetinaNet', 'Semantic FPN', 'UperNet',
                            'official classifier')
    assert (meta['Head'] == 'official classifier') == (cfg.model.type == 'ImageClassifier')
    with_masks = 'mask_head' in cfg.model.get('roi_head', {})
    expected_tasks = (['Image Classification'] if cfg.model.type == 'ImageClassifier' else
                      ['Semantic Segmentation'] if 'decode_head' in cfg.model else
                      ['Object Detection'] + ['Instance Segmentation'] * with_masks)
    assert meta['Task'] == [r['Task'] for r in entry['Results']] == expected_tasks
    schedule = 'Epochs' if 'max_epochs' in cfg.train_cfg else 'Iterations'
    assert meta[schedule] == cfg.train_cfg.get('max_epochs', cfg.train_cfg.get('max_iters'))


def is_imagenet_classifier(e) -> bool:
    return e['Metadata']['Head'] == 'official classifier' and not e['Metadata'].get('Toy')


def test_results_empty_and_no_weights(index):
    """Detectors and segmentors: nothing reproduced, no weights. ImageNet classifiers: the
    authors' published accuracy as the target, said to be theirs, with their checkpoint."""
    classifiers = 0
    for e in index['models']:
        assert e['Results'] and all(r['Dataset'] == e['Metadata']['Training Data']
                                    for r in e['Results'])
        assert e['Weights'] is None
        if not is_imagenet_classifier(e):
            assert all(v is None for r in e['Results'] for v in r['Metrics'].values())
            assert e['Status']['Weights'] == 'none published'
            continue
        classifiers += 1
        pub = MODELS.get(e['Metadata']['Backbone']['Type']).publication
        arch = e['Metadata']['Backbone']['Arch']
        (result, ) = e['Results']
        assert result['Dataset'] == 'ImageNet-1k'
        assert result['Metrics'] == {'Top 1 Accuracy': pub.imagenet_top1[arch],
                                     'Top 5 Accuracy': pub.imagenet_top5.get(arch)}
        assert "the authors' published accuracy" in e['Status']['Results']
        assert 'not reproduced by mmhat' in e['Status']['Results']
        assert e['Metadata']['Backbone']['Pretrained']
        # the whole classifier's count: the official model's (less HAT-Net's unused proj_norm)
        manifest = R.manifest(f'{MODELS.get(e["Metadata"]["Backbone"]["Type"]).reference_name}'
                              f'-{arch}')
        unused = sum(math.prod(v["shape"])
                     for k, v in manifest['state_dict'].items() if '.attn.proj_norm.' in k)
        assert e['Metadata']['Classifier']['Parameters (M)'] == round(
            (manifest['params_total'] - unused) / 1e6, 3)
    assert classifiers == 16


def test_backbone_numbers_are_the_flop_counters(index):
    """Params (M) and GFLOPs as written (3 decimals) equal what ``backbone_flops`` measures at
    the family's ImageNet size; every variant of every family is measured once."""
    for e in index['models']:
        b = e['Metadata']['Backbone']
        measured = TOOL.measure(b['Type'], b['Arch'])  # backbone_flops, cached per variant
        size = MODELS.get(b['Type']).pretrain_size
        assert (b['Parameters (M)'], b['GFLOPs'], b['FLOPs Input']) == (
            round(measured['params'], 3), round(measured['gflops'], 3), f'{size}x{size}'), e['Name']


def test_verified_claims_are_the_contract_tests(index):
    """The outputs claim for each family's smallest variant, the parameter claim for every one;
    each names a test that exists and the reference file it compares against."""
    assert R.FLOAT64_REL == 1e-7  # the bar the outputs claim states
    for e in index['models']:
        cls = MODELS.get(e['Metadata']['Backbone']['Type'])
        arch = e['Metadata']['Backbone']['Arch']
        checks = [c['Check'] for c in e['Status']['Verified']]
        classifier = e['Metadata']['Head'] == 'official classifier'
        what = 'classifier logits' if classifier else 'backbone outputs'
        expected = ([f'{what} equal the official model on the reference case (float64, '
                     '1e-7)'] if arch == cls.smallest_arch else [])
        count = 'classifier parameter count' if classifier else 'parameter count'
        assert checks == expected + [f'{count} equals the official model'], e['Name']
        for check in e['Status']['Verified']:
            file, test = check['Test'].split('::')
            assert file == ('tests/cls/test_classifier.py' if classifier
                            else 'tests/test_backbones/test_contract.py')
            assert re.search(rf'^def {test}\(', (ROOT / file).read_text(), re.M)
            assert (ROOT / check['Reference']).is_file()


def test_committed_files_are_up_to_date(capsys):
    assert TOOL.main(['--check']) == 0, capsys.readouterr().out


def _copy_generated(to: Path):
    paths = ['model-index.yml', 'docs/model_zoo.md'] + [
        p.relative_to(ROOT).as_posix() for p in (ROOT / 'configs').glob('*/metafile.yml')]
    for rel in paths:
        (to / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, to / rel)


def test_check_says_what_is_stale(tmp_path, capsys):
    _copy_generated(tmp_path)
    assert TOOL.main(['--check', '--out-dir', str(tmp_path)]) == 0
    capsys.readouterr()

    meta = tmp_path / 'configs' / 'hatnet' / 'metafile.yml'
    meta.write_text(meta.read_text().replace('Parameters (M): 12.265', 'Parameters (M): 12.7', 1))
    page = tmp_path / 'docs' / 'model_zoo.md'
    page.write_text(page.read_text().replace('# Model zoo', '# Model zoo (edited prose)', 1))
    (tmp_path / 'configs' / 'gone').mkdir()
    (tmp_path / 'configs' / 'gone' / 'metafile.yml').write_text('Models: []\n')
    (tmp_path / 'model-index.yml').unlink()
    assert TOOL.main(['--check', '--out-dir', str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert 'configs/hatnet/metafile.yml: stale' in out
    assert '-      Parameters (M): 12.7' in out and '+      Parameters (M): 12.265' in out
    assert 'model-index.yml: missing' in out and 'configs/gone/metafile.yml' in out
    assert 'docs/model_zoo.md' not in out  # prose is the page's own; its tables are current

    # writing mends it, and keeps the page's prose
    (tmp_path / 'configs' / 'gone' / 'metafile.yml').unlink()
    assert TOOL.main(['--out-dir', str(tmp_path)]) == 0
    assert TOOL.main(['--check', '--out-dir', str(tmp_path)]) == 0
    assert '# Model zoo (edited prose)' in page.read_text()


def test_a_family_without_collection_data_is_a_clear_error(capsys):
    class Undocumented(PyramidBackbone):
        arch_zoo = {'tiny': dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1))}
        reference_name = 'undocumented'

    MODELS.register_module(module=Undocumented)
    try:
        assert TOOL.main(['--check']) == 2
    finally:
        MODELS._module_dict.pop('Undocumented')
    err = capsys.readouterr().err
    assert "Undocumented ('undocumented')" in err and 'publication = Publication(' in err


def test_a_publication_names_the_official_file_at_a_commit():
    from mmhat.models.backbones.base import Publication
    args = ('Net', 'A paper', 'Venue 2026', 'https://arxiv.org/abs/0000.00000')
    pub = Publication(*args, code='https://github.com/o/r/blob/' + 'a' * 40 + '/models/net.py',
                      published='nowhere')
    assert (pub.repository, pub.commit, pub.file) == ('https://github.com/o/r', 'a' * 40,
                                                       'models/net.py')
    with pytest.raises(ValueError, match='must be a GitHub file at a commit'):
        Publication(*args, code='https://github.com/o/r', published='nowhere')


def test_page_links_resolve_and_name_no_machine_paths():
    page = (ROOT / 'docs' / 'model_zoo.md').read_text()
    targets = re.findall(r'\]\((\.\./[^)#]+)', page)
    assert len(targets) > len(CONFIGS)  # every config is linked, and model-index.yml
    assert [t for t in targets if not (ROOT / 'docs' / t).resolve().is_file()] == []
    assert not re.search(r'(/work/|/tmp/|/root/|/home/|site-packages)', page)


def test_readme_model_table_is_the_flop_counters():
    """The README's short table: params and GFLOPs of every variant, to one decimal, as
    measured (the same cached measurements as the metafiles)."""
    import mmhat.models  # noqa: F401
    from mmhat.registry import MODELS
    readme = (ROOT / 'README.md').read_text()
    rows = {m[1]: m for m in re.finditer(r'^\| `(mmhat\.\w+)` \| ([^|]+) \| ([^|]+) \| ([^|(]+)',
                                          readme, re.M)}
    from mmhat.models.backbones import registered_families
    assert set(rows) == {f'mmhat.{cls.__name__}' for cls in registered_families()}
    for type_name, m in rows.items():
        archs = [a.strip() for a in m[2].split('/')]
        assert archs == list(MODELS.get(type_name).arch_zoo), type_name
        measured = [TOOL.measure(type_name, a) for a in archs]
        assert [float(v) for v in m[3].split('/')] == [round(r['params'], 1) for r in measured]
        assert [float(v) for v in m[4].split('/')] == [round(r['gflops'], 1) for r in measured]
