"""The process-wide switches of the layers (fused attention, CPU conv kernels, activation
recompute, ``with_cp``'s attention replay) read their defaults from the environment here."""
import os

_ON = ('1', 'true', 'on', 'yes')
_OFF = ('0', 'false', 'off', 'no')


def env_switch(name: str, default: bool = True) -> bool:
    """The boolean environment variable ``name`` (unset or empty: ``default``).

    Raises:
        ValueError: for a value that is neither on (1/true/on/yes) nor off (0/false/off/no),
            so that a typo does not silently leave a switch on.
    """
    value = os.environ.get(name, '').strip().lower()
    if not value:
        return default
    if value in _ON or value in _OFF:
        return value in _ON
    raise ValueError(f'{name}={os.environ[name]!r}: set it to one of {", ".join(_OFF)} (off) '
                     f'or {", ".join(_ON)} (on), or unset it')
