"""Atomic writes: build a file or directory under a temporary sibling name, then rename it into place."""
from __future__ import annotations

import contextlib
import os
import shutil


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_write(dst: str, *, directory: bool):
    """Yields ``<dst>.partial`` to write into (created empty when ``directory``). On success it
    replaces ``dst`` in one rename; on any error it is deleted. So ``dst`` is either absent,
    the old version or the complete new one, never half written. Whether an existing ``dst``
    may be replaced is the caller's decision, made before entering."""
    dst = os.path.abspath(dst)
    tmp = dst + ".partial"
    _remove(tmp)  # left over by an interrupted earlier attempt
    os.makedirs(tmp if directory else os.path.dirname(dst), exist_ok=True)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if directory and os.path.isdir(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)
