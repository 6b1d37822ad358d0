"""mmhat: HAT-Net, TransCNN, GroupMixFormer and Shunted Transformer backbones
for MMDetection 3.x and MMSegmentation 1.x."""
import re
import shutil
from pathlib import Path
from typing import List

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
#: where a built (non-editable) package keeps the repository's configs, as mmdet and mmseg
#: do (``mmdet/.mim/configs``); ``python -m mmhat.configs`` finds them there
CONFIGS_IN_PACKAGE = Path('mmhat') / '.mim' / 'configs'


def read_version() -> str:
    text = (HERE / 'mmhat' / 'version.py').read_text()
    return re.search(r"__version__ = '([^']+)'", text).group(1)


class BuildPyWithConfigs(build_py):
    """``build_py`` that also copies ``configs/`` into the built package.

    The copy goes to the build directory only, never into the source tree, so nothing
    appears that git would see. The tree keeps its layout (``_base_/``, ``det/``, ``seg/``),
    so the configs' relative ``_base_`` paths resolve from the installed location too.

    Before building, the package left in the build directory by an earlier build is removed:
    setuptools never deletes from it, and a module deleted from the source would otherwise
    still ship in the next wheel.

    An editable install (``pip install -e .``) builds nothing here: mmhat is imported from
    the checkout and finds the configs at ``<checkout>/configs``.
    """

    def _copied_configs(self) -> List[Path]:
        source = HERE / 'configs'
        return sorted(p for p in source.rglob('*.py') if '__pycache__' not in p.parts)

    def run(self) -> None:
        if self.editable_mode:
            return super().run()
        shutil.rmtree(Path(self.build_lib) / 'mmhat', ignore_errors=True)
        super().run()
        source = HERE / 'configs'
        files = self._copied_configs()
        if not files:
            raise RuntimeError(f'no configs under {source}: a package built without them '
                               'would have nothing for `python -m mmhat.configs`')
        target = Path(self.build_lib) / CONFIGS_IN_PACKAGE
        for path in files:
            out = target / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)

    def get_outputs(self, include_bytecode: bool = True) -> List[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        source, target = HERE / 'configs', Path(self.build_lib) / CONFIGS_IN_PACKAGE
        return outputs + [str(target / p.relative_to(source)) for p in self._copied_configs()]


setup(
    name='mmhat',
    version=read_version(),
    description='Hierarchical-attention backbones (HAT-Net, TransCNN, GroupMixFormer, '
                'Shunted Transformer) for MMDetection and MMSegmentation',
    long_description=(HERE / 'README.md').read_text() if (HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmhat', 'mmhat.*']),
    cmdclass={'build_py': BuildPyWithConfigs},
    python_requires='>=3.9',
    # Supported: torch 2.1 to 2.13 (tested: 2.1.2 with numpy 1.26 by `make test-compat`,
    # 2.13.0 with numpy 2 by `make test`; torch < 2.4 needs numpy < 2), Python 3.9-3.11 with
    # torch 2.1 (tested: 3.11), mmengine 0.10.x, mmcv 2.1.0 with ops, mmdet 3.3, mmseg 1.2
    # (docs/get_started.md, "Supported versions"). torch and mmcv (compiled with ops) are
    # installed by tools/setup_env.sh; listing them here would let pip replace a CPU/CUDA
    # torch the user chose.
    install_requires=['mmengine>=0.10.0,<1.0', 'mmdet>=3.0,<3.4', 'mmsegmentation>=1.0,<1.3',
                      'ftfy', 'regex'],
    # ImageNet classification through mmpretrain (configs/cls/, docs/imagenet.md): optional,
    # never needed by the detection/segmentation path. torchvision must match your torch.
    extras_require={'cls': ['mmpretrain>=1.2,<1.3', 'torchvision']},
    license='Apache-2.0',
    classifiers=['Programming Language :: Python :: 3.9',
                 'Programming Language :: Python :: 3.10',
                 'Programming Language :: Python :: 3.11',
                 'Topic :: Scientific/Engineering :: Artificial Intelligence'],
)
