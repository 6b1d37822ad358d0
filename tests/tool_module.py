"""A script of ``tools/`` as a module (``tools/`` is not a package), for tests of its functions."""
import importlib.util
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / 'tools'


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py``, executed afresh as the module ``mmhat_tools_<name>``."""
    spec = importlib.util.spec_from_file_location(f'mmhat_tools_{name}', TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
