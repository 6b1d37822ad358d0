"""The configs that come with mmhat: list them, print their paths, copy them out.

mmengine resolves ``package::path`` base configs only for a fixed list of OpenMMLab packages,
so a config cannot say ``_base_ = 'mmhat::det/...'``. It can name the file by its absolute
path, which this command prints::

    python -m mmhat.configs list [PATTERN] [--all]
    python -m mmhat.configs path NAME
    python -m mmhat.configs copy NAME [DEST] [--force]

``NAME`` is a config's path below the configs folder (``det/maskrcnn_hatnet_t_coco.py``), or
its file name, with or without ``.py``. ``list`` shows the ``det/`` and ``seg/`` configs
(``--all`` adds the ``_base_/`` files they inherit from); ``PATTERN`` is a substring, or a
shell pattern when it has ``*``, ``?`` or ``[``. ``copy`` writes a standalone file whose
``_base_`` entries are the absolute paths of the installed base configs, so it loads from
anywhere (default ``DEST``: the config's file name in the current folder).

An installed mmhat (``pip install .`` or a wheel) keeps the configs in
``<site-packages>/mmhat/.mim/configs``, as mmdet and mmseg keep theirs; an editable install
or a checkout on ``PYTHONPATH`` uses ``<checkout>/configs``. The configs' relative
``_base_`` paths work from both.

Exit status: 0 on success, 1 when ``list`` matches nothing, 2 for bad input (an unknown or
ambiguous ``NAME``, an existing ``DEST`` without ``--force``), with a message and no
traceback.
"""
import argparse
import ast
import difflib
import fnmatch
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Union

from mmhat.version import __version__

#: the folders of complete configs, as opposed to ``_base_`` (the parts they inherit)
CONFIG_GROUPS = ('det', 'seg')
BASE_DIR = '_base_'
_PACKAGE_DIR = Path(__file__).resolve().parent


class ConfigNotFoundError(LookupError):
    """A config name that matches no shipped config, or more than one."""


def config_root() -> Path:
    """The folder that holds mmhat's configs (``_base_/``, ``det/``, ``seg/``).

    ``<mmhat package>/.mim/configs`` for an installed package, else ``configs/`` next to the
    package in a checkout.

    Raises:
        ConfigNotFoundError: neither exists (a package built without its configs).
    """
    candidates = [_PACKAGE_DIR / '.mim' / 'configs', _PACKAGE_DIR.parent / 'configs']
    for root in candidates:
        if all((root / group).is_dir() for group in CONFIG_GROUPS):
            return root
    raise ConfigNotFoundError(
        'mmhat is installed without its configs: looked in '
        + ' and '.join(str(c) for c in candidates)
        + '. Reinstall it from a wheel built with `pip wheel .` or with `pip install .`.')


def _all_configs(root: Path) -> List[str]:
    """Every config file below ``root``, as ``/``-separated paths relative to it."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob('*.py')
                  if '__pycache__' not in p.parts)


def list_configs(pattern: Optional[str] = None, include_bases: bool = False) -> List[str]:
    """Names of the shipped configs (``det/...py``, ``seg/...py``), sorted.

    Args:
        pattern: keep the names that contain it (case-insensitive), or, when it has ``*``,
            ``?`` or ``[``, those whose path or file name matches it as a shell pattern.
        include_bases: also list the ``_base_/`` files.
    """
    names = [n for n in _all_configs(config_root())
             if include_bases or n.split('/', 1)[0] in CONFIG_GROUPS]
    if not pattern:
        return names
    if any(c in pattern for c in '*?['):
        return [n for n in names if fnmatch.fnmatch(n, pattern)
                or fnmatch.fnmatch(n.rsplit('/', 1)[-1], pattern)]
    return [n for n in names if pattern.lower() in n.lower()]


def _normalise(name: str) -> str:
    name = name.strip().replace('\\', '/')
    for prefix in ('mmhat::', './', 'configs/'):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name if name.endswith('.py') else name + '.py'


def resolve_name(name: str) -> str:
    """The shipped config ``name`` stands for, as a path relative to :func:`config_root`.

    ``name`` may be the relative path (``det/maskrcnn_hatnet_t_coco.py``) or the file name
    (``maskrcnn_hatnet_t_coco``), with or without ``.py``.

    Raises:
        ConfigNotFoundError: no config or several configs fit; the message lists candidates.
    """
    names = _all_configs(config_root())
    wanted = _normalise(name)
    if wanted in names:
        return wanted
    by_file = [n for n in names if n.rsplit('/', 1)[-1] == wanted]
    if len(by_file) == 1:
        return by_file[0]
    if by_file:
        raise ConfigNotFoundError(f'{name!r} is ambiguous; say which: ' + ', '.join(by_file))
    stem = wanted[:-3].lower()
    # names that contain it (complete configs before _base_ files), then similar ones
    containing = sorted((n for n in names if stem in n[:-3].lower()),
                        key=lambda n: (n.startswith(BASE_DIR), n))
    by_stem = {n[:-3]: n for n in names}
    by_stem.update({n.rsplit('/', 1)[-1][:-3]: n for n in names})
    similar = [by_stem[s] for s in difflib.get_close_matches(
        stem.rsplit('/', 1)[-1], list(by_stem), n=6, cutoff=0.6)]
    suggestions = list(dict.fromkeys(containing + similar))
    shown = 6
    if suggestions:
        hint = '; close matches: ' + ', '.join(suggestions[:shown])
        if len(suggestions) > shown:
            hint += f' (and {len(suggestions) - shown} more)'
    else:
        hint = '; `python -m mmhat.configs list` shows them all'
    raise ConfigNotFoundError(f'no mmhat config {name!r}' + hint)


def config_path(name: str) -> Path:
    """Absolute path of the shipped config ``name`` (see :func:`resolve_name`)."""
    return (config_root() / resolve_name(name)).resolve()


def _char_offset(lines: List[str], lineno: int, col_offset: int) -> int:
    """Character offset in the joined ``lines`` of an ``ast`` position (1-based line,
    UTF-8 byte column)."""
    line = lines[lineno - 1]
    return sum(len(x) for x in lines[:lineno - 1]) + len(
        line.encode('utf-8')[:col_offset].decode('utf-8'))


def _absolute_base(entry: str, folder: Path) -> str:
    """A ``_base_`` entry made independent of the file's location (``pkg::path`` stays)."""
    if '::' in entry or os.path.isabs(entry):
        return entry
    return str((folder / entry).resolve())


def standalone_config(name: str) -> str:
    """The text of config ``name`` with each relative ``_base_`` entry made absolute.

    The result loads from any folder as long as this mmhat installation stays where it is.
    ``{{_base_.xxx}}`` references and everything else are kept as they are.
    """
    relative = resolve_name(name)
    path = config_root() / relative
    text = path.read_text(encoding='utf-8')
    lines = text.splitlines(keepends=True)
    for node in ast.parse(text, filename=str(path)).body:
        if not (isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == '_base_' for t in node.targets)):
            continue
        value = ast.literal_eval(node.value)
        if isinstance(value, str):
            new = repr(_absolute_base(value, path.parent))
        else:
            new = '[\n' + ''.join(f'    {_absolute_base(v, path.parent)!r},\n'
                                  for v in value) + ']'
        start = _char_offset(lines, node.value.lineno, node.value.col_offset)
        end = _char_offset(lines, node.value.end_lineno, node.value.end_col_offset)
        text = text[:start] + new + text[end:]
        break
    header = (f'# {relative} of mmhat {__version__}, copied by `python -m mmhat.configs copy`.\n'
              f'# Its _base_ entries point into {config_root()}: copy it again if mmhat moves.\n')
    return header + text


def copy_config(name: str, dest: Optional[Union[str, Path]] = None,
                force: bool = False) -> Path:
    """Write :func:`standalone_config` of ``name`` to ``dest`` and return the written path.

    Args:
        name: a shipped config (see :func:`resolve_name`).
        dest: a file, or a folder to put the config's file name into; default: the current
            folder. Missing parent folders are created.
        force: overwrite an existing file.

    Raises:
        ConfigNotFoundError: ``name`` is unknown or ambiguous.
        FileExistsError: ``dest`` exists and ``force`` is false.
    """
    text = standalone_config(name)
    file_name = resolve_name(name).rsplit('/', 1)[-1]
    target = Path(dest) if dest is not None else Path.cwd()
    if target.is_dir() or str(dest).endswith(('/', os.sep)):
        target = target / file_name
    if target.exists() and not force:
        raise FileExistsError(f'{target} exists; pass --force to overwrite it')
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding='utf-8')
    return target.resolve()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m mmhat.configs', description=__doc__.split('\n\n')[0],
        epilog='Use a shipped config from your own config file with one line: '
               "_base_ = '<the path printed by `python -m mmhat.configs path NAME`>'")
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    show = commands.add_parser('list', help='list the shipped configs')
    show.add_argument('pattern', nargs='?', metavar='PATTERN',
                      help='a substring, or a shell pattern (with *, ? or [)')
    show.add_argument('--all', action='store_true', help='also list the _base_/ files')
    path = commands.add_parser('path', help='print the absolute path of one config')
    path.add_argument('name', metavar='NAME', help='e.g. det/maskrcnn_hatnet_t_coco.py')
    copy = commands.add_parser(
        'copy', help='copy one config out, with absolute _base_ paths')
    copy.add_argument('name', metavar='NAME', help='e.g. det/maskrcnn_hatnet_t_coco.py')
    copy.add_argument('dest', nargs='?', metavar='DEST',
                      help='file or folder to write (default: the current folder)')
    copy.add_argument('--force', action='store_true', help='overwrite an existing file')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (see the module's docstring)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == 'list':
            names = list_configs(args.pattern, include_bases=args.all)
            if not names:
                print(f'no mmhat config matches {args.pattern!r}', file=sys.stderr)
                return 1
            print('\n'.join(names))
        elif args.command == 'path':
            print(config_path(args.name))
        else:
            print(copy_config(args.name, args.dest, force=args.force))
    except BrokenPipeError:  # e.g. `... list | head`
        sys.stderr.close()
    except (ConfigNotFoundError, OSError) as error:  # OSError: DEST exists or is unwritable
        print(f'error: {error}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
