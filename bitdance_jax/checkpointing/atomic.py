"""Atomic writes: build a file or directory under a temporary sibling name, then rename it into place.

A directory cannot be renamed over a non-empty one, so replacing one takes three steps: the
old ``dst`` is renamed to ``<dst>.previous``, the new one is renamed in, then the old one is
deleted. A crash between the first two leaves ``<dst>.previous`` alone; ``recover`` (run by the
next write of ``dst`` and by ``param_dir.read_meta``) puts it back. What is renamed into place
is fsynced first (its files and folders, then the parent), so after a power cut ``dst`` is the
old or the new version with its contents, not an empty shell.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil


def remove(path: str) -> None:
    """Delete a file, link or directory tree, if there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


PREVIOUS = ".previous"  # suffix of the old copy while a directory is being replaced


def recover(dst: str) -> None:
    """Undo what a crash while replacing ``dst`` left behind: when ``dst`` is missing, its old
    copy goes back in place."""
    previous = dst + PREVIOUS
    if os.path.lexists(previous) and not os.path.lexists(dst):
        try:
            os.replace(previous, dst)
        except FileNotFoundError:  # another process put it back first
            pass


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """fsync every file and folder under ``path`` (or the file ``path``), deepest first."""
    if not os.path.isdir(path):
        _fsync(path)
        return
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(os.path.join(root, name))
        _fsync(root)


def _prepare(dst: str, tmp: str, directory: bool) -> None:
    recover(dst)
    remove(dst + PREVIOUS)  # the old copy of a replace that crashed after its rename
    remove(tmp)  # left over by an interrupted earlier attempt
    os.makedirs(tmp if directory else os.path.dirname(dst), exist_ok=True)


def _move_into_place(tmp: str, dst: str, directory: bool) -> None:
    """Durably replace ``dst`` by the complete ``tmp``; at every instant ``dst`` or
    ``<dst>.previous`` holds a complete version."""
    parent = os.path.dirname(dst)
    _fsync_tree(tmp)
    _fsync(parent)  # tmp's own entry
    if directory and os.path.isdir(dst) and not os.path.islink(dst):
        os.replace(dst, dst + PREVIOUS)
        os.replace(tmp, dst)
        _fsync(parent)
        shutil.rmtree(dst + PREVIOUS)
    else:
        os.replace(tmp, dst)  # a file, or nothing yet: one atomic rename
    _fsync(parent)


def _barrier_name(kind: str, path: str) -> str:
    return f"{kind}:{hashlib.sha1(path.encode()).hexdigest()[:16]}"


@contextlib.contextmanager
def atomic_write(dst: str, *, directory: bool, all_processes: bool = False):
    """Yields ``<dst>.partial`` to write into (created empty when ``directory``). On success it
    replaces ``dst`` (one rename for a file; for a directory the three steps of the module
    docstring); on any error it is deleted. So ``dst`` is either absent,
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
        _prepare(dst, tmp, directory)
        try:
            yield tmp
        except BaseException:
            remove(tmp)
            raise
        _move_into_place(tmp, dst, directory)
        return

    main = distributed.is_main()
    if main:
        _prepare(dst, tmp, directory)
    distributed.barrier(_barrier_name("atomic_write.start", dst))
    try:
        yield tmp
    except BaseException:
        # No barrier on this path: the others learn of it as a barrier timeout or, when this
        # process exits, from the distributed client's heartbeat.
        if main:
            remove(tmp)
        raise
    distributed.barrier(_barrier_name("atomic_write.written", dst))
    if main:
        _move_into_place(tmp, dst, directory)
    distributed.barrier(_barrier_name("atomic_write.renamed", dst))
