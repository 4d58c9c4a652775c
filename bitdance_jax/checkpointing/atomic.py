"""Atomic writes: build a file or directory under a temporary sibling name, then rename it into place."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _barrier_name(kind: str, path: str) -> str:
    return f"{kind}:{hashlib.sha1(path.encode()).hexdigest()[:16]}"


@contextlib.contextmanager
def atomic_write(dst: str, *, directory: bool, all_processes: bool = False):
    """Yields ``<dst>.partial`` to write into (created empty when ``directory``). On success it
    replaces ``dst`` in one rename; on any error it is deleted. So ``dst`` is either absent,
    the old version or the complete new one, never half written. Whether an existing ``dst``
    may be replaced is the caller's decision, made before entering.

    ``all_processes``: every process of a multi-process job enters with the same ``dst`` (on a
    file system they share) and writes into the same temporary directory, e.g. an Orbax save,
    which is a collective. Process 0 alone clears and creates it, and renames it once every
    process has left the block; barriers separate the three, and no process returns before
    ``dst`` is in place. Files that must be written once are the caller's to guard with
    ``distributed.is_main()``. With one process it is the plain form."""
    dst = os.path.abspath(dst)
    tmp = dst + ".partial"
    from bitdance_jax.parallel import distributed
    if not all_processes or distributed.process_count() == 1:
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
        return

    main = distributed.is_main()
    if main:
        _remove(tmp)
        os.makedirs(tmp if directory else os.path.dirname(dst), exist_ok=True)
    distributed.barrier(_barrier_name("atomic_write.start", dst))
    try:
        yield tmp
    except BaseException:
        # No barrier on this path: the others learn of it as a barrier timeout or, when this
        # process exits, from the distributed client's heartbeat.
        if main:
            _remove(tmp)
        raise
    distributed.barrier(_barrier_name("atomic_write.written", dst))
    if main:
        if directory and os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    distributed.barrier(_barrier_name("atomic_write.renamed", dst))
