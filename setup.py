"""mmhat: HAT-Net, TransCNN, GroupMixFormer and Shunted Transformer backbones
for MMDetection 3.x and MMSegmentation 1.x."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_version() -> str:
    text = (HERE / 'mmhat' / 'version.py').read_text()
    return re.search(r"__version__ = '([^']+)'", text).group(1)


setup(
    name='mmhat',
    version=read_version(),
    description='Hierarchical-attention backbones (HAT-Net, TransCNN, GroupMixFormer, '
                'Shunted Transformer) for MMDetection and MMSegmentation',
    long_description=(HERE / 'README.md').read_text() if (HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmhat', 'mmhat.*']),
    python_requires='>=3.9',
    # torch and mmcv (compiled with ops) are installed by tools/setup_env.sh; listing
    # them here would let pip replace a CPU/CUDA torch the user chose.
    install_requires=['mmengine>=0.10.0,<1.0', 'mmdet>=3.0,<3.4', 'mmsegmentation>=1.0,<1.3',
                      'ftfy', 'regex'],
    license='Apache-2.0',
)
