"""Confining file paths to allowed roots.

A path is inside a root when its parent directory, with every symlink
resolved, lies under the root (also resolved) and the path's last component
is not itself a symlink. That refuses both `..` escapes and symlinks planted
inside a root that point out of it, while allowing roots that themselves sit
behind a symlink (such as `/tmp` on some systems).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

_SHOWN = 120  # characters of a refused path put in a message


def _show(path: str) -> str:
    return repr(path) if len(path) <= _SHOWN else repr(path[:_SHOWN]) + f"... ({len(path)} characters)"


class PathNotAllowedError(ValueError):
    pass


def confine(path: str, roots: Sequence[str], *, resolve: Callable[[str], str] = os.path.realpath) -> Path:
    """Return `path` resolved if it lies inside one of `roots`, else raise PathNotAllowedError. `resolve` resolves
    a directory's symlinks (`os.path.realpath`; a batch of observations may remember its answers meanwhile)."""
    if not path or not os.path.isabs(path):
        raise PathNotAllowedError(f"path {_show(path)} is not absolute")
    if "\x00" in path:
        raise PathNotAllowedError("path contains a NUL byte")
    if not roots:
        raise PathNotAllowedError(f"path {_show(path)} is outside the allowed roots (none are configured)")
    candidate = Path(path)
    if candidate.name in ("", ".", ".."):
        raise PathNotAllowedError(f"path {_show(path)} does not name a file")
    parent = Path(resolve(str(candidate.parent)))
    resolved = parent / candidate.name
    for root in roots:
        real_root = Path(resolve(root))
        if resolved == real_root:
            raise PathNotAllowedError(f"path {_show(path)} is the allowed root {root} itself and names no file in it")
        if resolved.is_relative_to(real_root):
            if resolved.is_symlink():
                raise PathNotAllowedError(f"path {_show(path)} is a symbolic link")
            return resolved
    raise PathNotAllowedError(f"path {_show(path)} is outside the allowed roots {', '.join(roots)}")
