"""Write outputs to a temporary sibling and rename them into place; lock a directory for one writer.

A crash or Ctrl-C never leaves a half-written file or directory at the destination: readers see
either the old complete output or the new complete output. A replaced directory is swapped with the
new one in one step on Linux (``renameat2(RENAME_EXCHANGE)``), so the destination always exists;
where the kernel or file system cannot exchange, the old output is renamed aside, the new one renamed
in, and the old one put back if that fails (readers may then find no destination for the instant
between the two renames, but a crash never loses the old output: it is kept as ``.NAME.old-PID-*``).

Temporary names carry the writer's process id (``.NAME.tmp-PID-XXXXXXXX``, ``.NAME.old-PID-XXXXXXXX``);
whenever a new one is made, those left next to it by processes that no longer exist are removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from coplctl.core.errors import CoplError

_STALE = re.compile(r"(?:tmp|old)-(\d+)-[a-z0-9_]+")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_parent(dest: Path) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder should be, no permission ...
        raise CoplError(f"cannot write {dest}: {e.strerror or e} ({e.filename or dest.parent})") from None


def _tmp_prefix(dest: Path, kind: str = "tmp") -> str:
    return f".{dest.name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user's counts as alive)."""
    if pid <= 0:
        return True  # never a writer's id; leave such names alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists but belongs to someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_stale(dest: str | Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` siblings of ``dest`` whose process is gone.

    Temporaries of live processes (this one included) are kept. Returns what was removed.
    """
    dest = Path(dest)
    head = f".{dest.name}."
    removed = []
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(head):
            continue
        m = _STALE.fullmatch(name[len(head):])
        if m and not _alive(int(m.group(1))):
            _remove(dest.parent / name)
            removed.append(dest.parent / name)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unavailable.

    A failed call changes nothing, so the caller can always fall back to plain renames.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, some musl builds)
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _replace(tmp: Path, dest: Path) -> None:
    """Put directory ``tmp`` at ``dest``; an existing ``dest`` stays in place until the new one is there."""
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        return
    if _exchange(tmp, dest):
        _remove(tmp)  # it now holds the old output
        return
    old = dest.parent / f"{_tmp_prefix(dest, 'old')}{secrets.token_hex(4)}"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(old, dest)
        raise
    _remove(old)


def check_output(dest: str | Path, *, force: bool, marker: str, kind: str, option: str = "--out") -> None:
    """Before any work: an existing ``dest`` needs ``force``, and is then replaced only if it is a ``kind``."""
    if os.path.lexists(dest) and not force:
        raise CoplError(f"{dest} already exists; choose another {option} or pass --force to replace it")
    check_replaceable(dest, marker, kind)


#: files that mark a directory as something coplctl reads (never a place for another command's output)
KNOWN_INPUTS = {"method.json": "a trained run", "meta.json": "a dataset", "embeddings.safetensors": "a GCF run",
                "adapter_config.json": "an export", "spec.json": "a benchmark's output"}
STDOUT = ("-", "/dev/stdout")


def check_file_output(dest: str | Path, *, force: bool, inputs: dict[str, str | Path | None] | None = None,
                      option: str = "--output") -> Path | None:
    """The one rule for a command's output file, checked before any work; returns the path to write, or None
    for standard output (``-`` or ``/dev/stdout``).

    Refused: a path that is (or lies inside, or contains) one of ``inputs``; a path inside a directory
    coplctl reads (a run, a dataset, a GCF run, an export, a benchmark's output: :data:`KNOWN_INPUTS`);
    anything but a regular file there (a directory, a symlink, a pipe, a device: never replaced by a file);
    an existing file without ``force``."""
    if str(dest) in STDOUT:
        return None
    dest = Path(dest)
    refuse_overlap(dest, inputs or {}, option)
    if dest.is_symlink() or (dest.exists() and not dest.is_file()):
        what = ("a symlink" if dest.is_symlink() else "a directory" if dest.is_dir() else
                "not a regular file (a pipe or a device)")
        raise CoplError(f"{option} {dest} is {what}; coplctl never replaces one with a file: give a new file path, "
                        f"or - for standard output")
    refuse_inside_known(dest, option)
    if dest.exists() and not force:
        raise CoplError(f"{option} {dest} already exists; choose another path or pass --force to replace it")
    return dest


def refuse_inside_known(dest: str | Path, option: str = "--out", *, itself: bool = False) -> None:
    """Raise CoplError when ``dest`` lies inside a directory coplctl reads (:data:`KNOWN_INPUTS`), or, with
    ``itself``, is one (an output directory that other files are written into: a report, a benchmark)."""
    resolved = Path(dest).resolve()
    for parent in ([resolved] if itself else []) + list(resolved.parents):
        for marker, kind in KNOWN_INPUTS.items():
            if (parent / marker).is_file():
                raise CoplError(f"{option} {dest} is inside {parent}, {kind}; write it elsewhere (its files are "
                                f"read by coplctl and must not be replaced)")


def check_replaceable(dest: str | Path, marker: str, kind: str) -> None:
    """Raise CoplError unless ``dest`` is absent, an empty directory or a ``kind`` (it holds ``marker``):
    --force replaces an output of the same kind, never whatever else happens to be at that path."""
    dest = Path(dest)
    if not os.path.lexists(dest):
        return
    if not dest.is_dir():
        raise CoplError(f"{dest} is a file, not a {kind}; refusing to replace it (choose another path)")
    if (dest / marker).exists() or not any(dest.iterdir()):
        return
    raise CoplError(f"{dest} holds something other than a {kind} (no {marker}); refusing to replace it with "
                    f"--force (remove it yourself or choose another path)")


@contextlib.contextmanager
def atomic_dir(dest: str | Path, *, overwrite: bool = False, marker: str | None = None,
               kind: str = "output") -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``dest`` when the block succeeds.

    Raises CoplError if ``dest`` exists and ``overwrite`` is false, or, with ``marker``, if ``dest`` is
    not a ``kind`` (see :func:`check_replaceable`). On any exception the temporary directory is
    removed and ``dest`` is left untouched.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise CoplError(f"{dest} already exists; choose another path or pass --force to replace it")
    if marker is not None:
        check_replaceable(dest, marker, kind)
    _make_parent(dest)
    remove_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(dest), dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers (safetensors) make 0600 files; outputs get the usual permissions
            if f.is_file() and not f.is_symlink():
                os.chmod(f, 0o666 & ~_umask())
        _replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _tmp_file(dest: Path) -> str:
    _make_parent(dest)
    remove_stale(dest)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(dest), dir=dest.parent)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_file(dest: str | Path, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary file next to ``dest``; it replaces ``dest`` when the block succeeds."""
    dest = Path(dest)
    tmp = _tmp_file(dest)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest`` for a writer that takes a file name; renamed on success."""
    dest = Path(dest)
    tmp = _tmp_file(dest)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(dest: str | Path, text: str) -> None:
    with atomic_file(dest, "w", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def locked(path: str | Path, what: str, *, by: str = "coplctl command",
           advice: str = "wait for it to finish") -> Iterator[None]:
    """Hold an exclusive lock on file ``path`` (created if needed) for the block; one process at a time.

    When another process holds it, raise CoplError at once: "WHAT is in use by another BY (pid N); ADVICE".
    The lock is ``flock`` on an open file: the kernel releases it when its holder exits, however it
    exits, so a killed run never leaves a stale lock. The file itself stays (removing it would let two
    processes lock two different files); it records the holder's pid and ``by`` for the message.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise CoplError(f"cannot create the lock file {path} ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CoplError(f"cannot lock {path} ({e.strerror or e})") from None
            pid, _, holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip().partition("\n")
            pid = f"pid {pid}" if pid.isdigit() else "pid unknown"
            raise CoplError(f"{what} is in use by another {holder.strip() or by} ({pid}); {advice}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{by}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def refuse_overlap(out: str | Path, inputs: dict[str, str | Path | None], option: str = "--out") -> None:
    """Raise CoplError when output ``out`` is, contains or lies inside one of ``inputs`` (what -> path), or lies
    inside any directory coplctl reads (:func:`refuse_inside_known`): an output never replaces or writes into
    an input, even with --force."""
    o = Path(out).resolve()
    for what, path in inputs.items():
        if path is None or not Path(path).exists():
            continue
        p = Path(path).resolve()
        if o == p:
            raise CoplError(f"{option} {out} is {what}; choose another {option}")
        if o.is_relative_to(p):
            raise CoplError(f"{option} {out} is inside {what} {path}; choose another {option}")
        if p.is_relative_to(o):
            raise CoplError(f"{option} {out} contains {what} {path}; choose another {option}")
    refuse_inside_known(out, option)  # after the named inputs, whose messages say more
