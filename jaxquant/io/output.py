"""Output files that appear whole or not at all, and output paths checked before any work."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from jaxquant.errors import JaxquantError


def check_output_path(path: str | os.PathLike, directory: bool = False) -> Path:
    """``path`` if a file (``directory``: a checkpoint directory) can be written there: its parent
    exists and is a writable directory, and ``path`` is not a directory (a file) or not a file (a
    directory). Called before hours of work, not after."""
    path = Path(path)
    parent = path.absolute().parent
    if not parent.is_dir():
        raise JaxquantError(f"{path}: cannot write there: the directory {parent} "
                            f"{'is not a directory' if parent.exists() else 'does not exist'}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise JaxquantError(f"{path}: cannot write there: no write permission in {parent}")
    if path.exists() and path.is_dir() != directory:
        raise JaxquantError(f"{path}: exists and is {'a file' if directory else 'a directory'}; choose another path")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """A name under which a writer (anything that opens a file by name) writes ``path``'s new
    contents; they appear at ``path`` in one rename when the block ends without an error.

    The data goes to an unnamed file (Linux ``O_TMPFILE``, reached as ``/proc/self/fd/N``) that is
    linked into the directory only once complete, so neither an error nor a kill leaves a partial
    file behind. Where the file system has no unnamed files: a hidden ``.NAME.PID.tmp`` beside
    ``path``, removed on errors (a kill leaves it)."""
    path = check_output_path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = None
    if hasattr(os, "O_TMPFILE"):
        try:
            fd = os.open(path.absolute().parent, os.O_TMPFILE | os.O_WRONLY, 0o666)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise JaxquantError(f"{path}: cannot write ({e.strerror})") from None
    try:
        yield str(tmp) if fd is None else f"/proc/self/fd/{fd}"
        try:
            if fd is not None:  # linkat(AT_SYMLINK_FOLLOW) of the magic link names the unnamed file
                tmp.unlink(missing_ok=True)
                proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.link(str(fd), tmp, src_dir_fd=proc)  # (a plain link() would not follow it)
                finally:
                    os.close(proc)
            os.replace(tmp, path)
        except OSError as e:
            raise JaxquantError(f"{path}: cannot write ({e.strerror})") from None
    finally:
        if fd is not None:
            os.close(fd)
        tmp.unlink(missing_ok=True)


__all__ = ["atomic_output", "check_output_path"]
