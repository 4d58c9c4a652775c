"""atomic_write under crashes: replacing a directory never leaves it missing (the old copy is
set aside, not deleted first), a crash is recovered by the next write or read, and what is
renamed into place was fsynced first."""
import os

import numpy as np
import pytest

from bitdance_jax.checkpointing import atomic, param_dir


class PowerCut(BaseException):
    pass


def write(dst, text, directory=True):
    with atomic.atomic_write(str(dst), directory=directory) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        with open(os.path.join(tmp, "sub", "v"), "w") as f:
            f.write(text)


def read(dst):
    with open(os.path.join(dst, "sub", "v")) as f:
        return f.read()


def cut_power_on_rename_in(monkeypatch):
    """The process dies right before the complete new copy is renamed into place."""
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".partial"):
            raise PowerCut
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_crash_before_rename_in_keeps_the_old_copy(tmp_path, monkeypatch):
    dst = tmp_path / "export"
    write(dst, "old")
    with monkeypatch.context() as m:
        cut_power_on_rename_in(m)
        with pytest.raises(PowerCut):
            write(dst, "new")
    assert read(str(dst) + atomic.PREVIOUS) == "old"  # set aside, never deleted
    # The next write puts it back before it starts, so failing again loses nothing.
    with pytest.raises(RuntimeError):
        with atomic.atomic_write(str(dst), directory=True):
            raise RuntimeError("the relaunch fails too")
    assert read(dst) == "old" and sorted(os.listdir(tmp_path)) == ["export"]
    write(dst, "new")
    assert read(dst) == "new" and sorted(os.listdir(tmp_path)) == ["export"]


def test_crash_after_rename_in_keeps_the_new_copy(tmp_path, monkeypatch):
    dst = tmp_path / "export"
    write(dst, "old")
    with monkeypatch.context() as m:
        m.setattr(atomic.shutil, "rmtree", lambda path: (_ for _ in ()).throw(PowerCut()))
        with pytest.raises(PowerCut):
            write(dst, "new")
    assert read(dst) == "new"
    write(dst, "newer")  # the stale old copy is cleared
    assert read(dst) == "newer" and sorted(os.listdir(tmp_path)) == ["export"]


def test_a_reader_recovers_the_old_param_dir(tmp_path, monkeypatch):
    dst = str(tmp_path / "tok")
    params = {"w": np.arange(3, dtype=np.float32)}
    param_dir.save_param_dir(dst, "test", {"n": 1}, params)
    with monkeypatch.context() as m:
        cut_power_on_rename_in(m)
        with pytest.raises(PowerCut):
            param_dir.save_param_dir(dst, "test", {"n": 2}, params, overwrite=True)
    meta, loaded = param_dir.load_param_dir(dst, "test")
    assert meta["config"] == {"n": 1}
    np.testing.assert_array_equal(loaded["w"], params["w"])


@pytest.mark.parametrize("directory", [True, False])
def test_contents_and_parent_are_fsynced_around_the_rename(tmp_path, monkeypatch, directory):
    dst = str(tmp_path / "out")
    if directory:
        write(dst, "old")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        ("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(
        ("replace", str(a), str(b))), real_replace(a, b))[1])
    tmp = dst + ".partial"
    if directory:
        write(dst, "new")
        contents = [("fsync", os.path.join(tmp, "sub", "v")), ("fsync", os.path.join(tmp, "sub")),
                    ("fsync", tmp)]
    else:
        with atomic.atomic_write(dst, directory=False) as path:
            with open(path, "w") as f:
                f.write("new")
        contents = [("fsync", tmp)]
    rename_in = events.index(("replace", tmp, dst))
    for event in contents + [("fsync", str(tmp_path))]:
        assert events.index(event) < rename_in, event
    assert events[-1] == ("fsync", str(tmp_path))  # the rename itself reaches the disk
