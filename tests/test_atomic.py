"""Atomic outputs: replacement keeps the old output until the new one is in place, temporaries of dead
processes are cleaned up, and a lock lets one process at a time write a directory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import coplctl.core.atomic as atomic
from coplctl.core.atomic import atomic_dir, atomic_file, atomic_path, atomic_write_text, locked, remove_stale
from coplctl.core.errors import CoplError


def _old_output(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a.txt").write_text("old")
    return dest


def _siblings(dest):
    return sorted(p.name for p in dest.parent.iterdir() if p.name != dest.name)


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    try:
        os.kill(proc.pid, 0)
    except ProcessLookupError:
        return proc.pid
    pytest.skip("the exited process's id was reused at once")


def test_replacement_swaps_in_the_new_output_and_leaves_nothing_behind(tmp_path):
    dest = _old_output(tmp_path)
    with atomic_dir(dest, overwrite=True) as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}-")
        (tmp / "b.txt").write_text("new")
        assert (dest / "a.txt").read_text() == "old"  # untouched while the new one is written
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"] and _siblings(dest) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_exchange_swaps_two_paths_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x").write_text("A")
    b.write_text("B")
    assert atomic._exchange(a, b)  # ext4, tmpfs, xfs, btrfs all exchange
    assert (b / "x").read_text() == "A" and a.read_text() == "B"
    assert not atomic._exchange(tmp_path / "missing", b)  # a failed call changes nothing
    assert (b / "x").read_text() == "A"


def test_the_destination_exists_at_every_step_of_an_exchange(tmp_path, monkeypatch):
    dest = _old_output(tmp_path)
    seen = []
    real = atomic._exchange

    def watch(a, b):
        seen.append(dest.is_dir())
        ok = real(a, b)
        seen.append(dest.is_dir())
        return ok

    monkeypatch.setattr(atomic, "_exchange", watch)
    monkeypatch.setattr(atomic.os, "rename", lambda *a: pytest.fail("an exchange needs no rename"))
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux's")
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("new")
    assert seen == [True, True] and (dest / "b.txt").read_text() == "new" and _siblings(dest) == []


def test_a_crash_after_the_exchange_leaves_the_new_output_and_a_temporary_cleaned_later(tmp_path, monkeypatch,
                                                                                        dead_pid):
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux's")
    dest = _old_output(tmp_path)

    def killed(path):
        raise KeyboardInterrupt  # Ctrl-C right after the swap, before the old output is removed

    monkeypatch.setattr(atomic, "_remove", killed)
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)  # as if the process died here
    with pytest.raises(KeyboardInterrupt), atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("new")
    monkeypatch.undo()
    assert (dest / "b.txt").read_text() == "new"
    [left] = _siblings(dest)
    assert left.startswith(f".out.tmp-{os.getpid()}-")
    remove_stale(dest)
    assert _siblings(dest) == [left]  # its owner (this process) is alive: kept
    os.rename(tmp_path / left, tmp_path / left.replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "c.txt").write_text("newer")
    assert _siblings(dest) == [] and (dest / "c.txt").read_text() == "newer"


@pytest.mark.parametrize("failing", ["second rename", "interrupt between renames"])
def test_without_exchange_a_failed_second_rename_puts_the_old_output_back(tmp_path, monkeypatch, failing):
    dest = _old_output(tmp_path)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # e.g. ENOSYS / EINVAL on this file system
    real = os.rename
    calls = []

    def rename(src, dst):
        calls.append((str(src), str(dst)))
        if len(calls) == 2:  # the new output moving in
            if failing == "second rename":
                raise OSError(28, "No space left on device")
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError if failing == "second rename" else KeyboardInterrupt):
        with atomic_dir(dest, overwrite=True) as tmp:
            (tmp / "b.txt").write_text("new")
    assert ".out.old-" in calls[0][1] and calls[2] == (calls[0][1], str(dest))  # put back
    assert (dest / "a.txt").read_text() == "old" and _siblings(dest) == []


def test_without_exchange_replacement_still_works(tmp_path, monkeypatch):
    dest = _old_output(tmp_path)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"] and _siblings(dest) == []


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path, dead_pid, monkeypatch):
    dest = tmp_path / "out"
    dead_dir, dead_old = tmp_path / f".out.tmp-{dead_pid}-abc_12", tmp_path / f".out.old-{dead_pid}-0f3a"
    dead_file = tmp_path / f".out.tmp-{dead_pid}-k2j3"
    mine = tmp_path / f".out.tmp-{os.getpid()}-keep1"
    others = [tmp_path / f".other.tmp-{dead_pid}-x1", tmp_path / ".out.tmp-notapid-x1", tmp_path / ".out.tmp-abc",
              tmp_path / f".out.tmp-{dead_pid}-UPPER", tmp_path / f".out.x.tmp-{dead_pid}-a1"]
    for d in (dead_dir, dead_old, mine, *others):
        d.mkdir()
    (dead_dir / "big.bin").write_bytes(b"0" * 10)
    dead_file.write_text("half")
    atomic_write_text(dest, "hello")
    assert dest.read_text() == "hello"
    left = set(_siblings(dest))
    assert left == {mine.name, *(o.name for o in others)}

    for d in (dead_dir, dead_old):
        d.mkdir()
    with atomic_path(dest) as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}-")
        tmp.write_text("via path")
    assert not dead_dir.exists() and not dead_old.exists() and dest.read_text() == "via path"

    dead_dir.mkdir()
    monkeypatch.setattr(atomic.os, "kill", lambda pid, sig: (_ for _ in ()).throw(PermissionError(1, "not yours")))
    with atomic_file(dest, "w") as f:
        f.write("via file")
    assert dead_dir.exists()  # a process of another user: treated as alive


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "f.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(dest) as f:
        f.write("half")
        raise RuntimeError
    assert dest.read_text() == "old" and _siblings(dest) == []


def test_a_second_holder_of_a_lock_gets_one_clear_error(tmp_path):
    lock = tmp_path / "res" / ".lock"
    lock.parent.mkdir()
    with locked(lock, "res", by="coplctl benchmark quick", advice="wait for it or use another --out"):
        with pytest.raises(CoplError, match=rf"^res is in use by another coplctl benchmark quick \(pid {os.getpid()}\); "
                                            r"wait for it or use another --out$"):
            with locked(lock, "res", advice="wait for it or use another --out"):  # the holder's `by` is shown
                pass
    with locked(lock, "res"):  # released at the end of the block
        pass


def test_a_killed_holder_never_leaves_a_stale_lock(tmp_path):
    lock = tmp_path / ".lock"
    code = textwrap.dedent(f"""
        import sys, time
        from coplctl.core.atomic import locked
        with locked({str(lock)!r}, "x"):
            print("locked", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(CoplError, match=rf"x is in use by another coplctl command \(pid {proc.pid}\)"):
            with locked(lock, "x"):
                pass
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    with locked(lock, "x"):
        assert lock.read_text().split() == [str(os.getpid()), "coplctl", "command"]


def test_an_output_under_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CoplError, match="cannot write .*f/out"):
        with atomic_dir(tmp_path / "f" / "out"):
            pass
    with pytest.raises(CoplError, match="cannot write"):
        atomic_write_text(tmp_path / "f" / "a" / "b.txt", "x")


def test_force_replaces_only_an_output_of_the_same_kind(tmp_path):
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("years of work")
    with pytest.raises(CoplError, match="holds something other than a dataset \\(no meta.json\\)"):
        with atomic_dir(other, overwrite=True, marker="meta.json", kind="dataset"):
            pass
    assert (other / "chapter1.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CoplError, match="is a file, not a dataset"):
        with atomic_dir(tmp_path / "file", overwrite=True, marker="meta.json", kind="dataset"):
            pass
    (other / "meta.json").write_text("{}")  # an output of the same kind is replaced
    with atomic_dir(other, overwrite=True, marker="meta.json", kind="dataset") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert sorted(p.name for p in other.iterdir()) == ["meta.json"]
