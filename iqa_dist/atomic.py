"""Files written whole or not at all, with the permissions the user's umask asks for.

A file is written under a hidden temporary name beside its destination and renamed over
it when complete (:func:`replace`), so a crash never leaves half a file. ``tempfile.mkstemp``
creates files as mode 0600, and so does safetensors: renamed into place as they are, a
shared data set, config or model would be private to its writer, and the other users of a
cluster would get "Permission denied". :func:`replace` therefore gives the file the mode an
ordinary ``open`` would (0666 less the umask) before it takes the destination's name.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

SUFFIX = ".tmp"  # every temporary ends so: a packer clears those a killed run left
# How a full disk shows: errno from Python, a message from torch's zip writer and safetensors.
_FULL_DISK = ("No space left", "unexpected pos", "StorageFull", "Disk quota exceeded")


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a write failing for want of space (or of quota)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(err) for text in _FULL_DISK)


def umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only swap it,
    which would race with threads creating files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextlib.contextmanager
def temporary(path: Path) -> Iterator[Path]:
    """A new, empty temporary file beside ``path`` (unique, so concurrent writers never
    share one), removed unless the caller moved it into place with :func:`replace`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def share(path: Path) -> None:
    """Give a file the umask's permissions, as ``open`` would have."""
    os.chmod(path, 0o666 & ~umask())


def replace(tmp: Path, path: Path) -> None:
    """Move a complete temporary to ``path`` with the umask's permissions."""
    share(tmp)
    os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str, exclusive: bool = False) -> bool:
    """Write ``path`` whole or not at all, creating its folder. ``exclusive``: only if it does
    not exist yet, atomically among concurrent writers (a hard link fails on an existing
    name); returns False when it did exist."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary(path) as tmp:
        tmp.write_text(text)
        share(tmp)
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    return True


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written in it (OSError if not): a run's
    output place is checked before its work, not after it, when the work would be lost."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass
