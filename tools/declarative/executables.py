"""Which program a command tool runs: argv[0] resolved through PATH and symlinks, then checked against an allowlist.

The allowlist (`tools.allowed_executables`) holds absolute paths or globs
(`*` stays within one path segment). A program is allowed when its real
path, every symlink resolved, matches an entry, or the entry's own real path
(for a glob, its directory's): so `/bin/systemctl` in the list allows
`/usr/bin/systemctl` where `/bin` is a link to `/usr/bin`, and a link inside
an allowed directory that points outside it is refused. An empty allowlist
refuses every program, like `agents.file.allowed_roots` refuses every path.
Resolution happens when the definition is loaded and again at every run;
the run executes the real path it checked (argv[0] as written is what the
program sees), so a link changed in between cannot redirect it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import PurePosixPath

_GLOB = frozenset("*?[")


class ExecutableNotAllowed(ValueError):
    pass


def resolve(program: str, allowed: Sequence[str], *, path: str | None = None) -> str:
    """The real path of `program` (a name looked up in `path`, default $PATH, or an absolute path), if the
    allowlist allows it; else ExecutableNotAllowed saying why."""
    if not allowed:
        raise ExecutableNotAllowed(
            f"{program!r} cannot run: tools.allowed_executables is empty, which refuses every command tool"
        )
    if "/" in program and not os.path.isabs(program):
        raise ExecutableNotAllowed(f"{program!r} is a relative path; give a name looked up in PATH or an absolute path")
    found = program if os.path.isabs(program) else shutil.which(program, path=path)
    if found is None:
        raise ExecutableNotAllowed(f"{program!r} is not found on PATH")
    real = os.path.realpath(found)
    if not os.path.isfile(real) or not os.access(real, os.X_OK):
        raise ExecutableNotAllowed(f"{program!r} ({real}) is not an executable file")
    if not any(_matches(real, entry) for entry in allowed):
        via = f" (through {found})" if found != real and found != program else ""
        raise ExecutableNotAllowed(
            f"{program!r} resolves to {real}{via}, which tools.allowed_executables ({', '.join(allowed)}) "
            f"does not allow"
        )
    return real


def _matches(real: str, entry: str) -> bool:
    candidate = PurePosixPath(real)
    if candidate.match(entry):
        return True
    head, _, tail = entry.rpartition("/")
    if _GLOB & set(entry):
        if _GLOB & set(head) or not head:
            return False
        return candidate.match(os.path.join(os.path.realpath(head), tail))
    return real == os.path.realpath(entry)
