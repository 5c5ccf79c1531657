"""One way to replace a file atomically, for the subnet file, the state file and Docker's
options file: readers (dockerd, CNI, ``pyflannel status``) see the old file or the new one,
never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, text: str, mode: int | None = 0o644) -> None:
    """Write ``text`` to a temp file beside ``path``, fsync it, then rename it over ``path``.

    A symlink at ``path`` is followed, so the file it points to is replaced (as a shell
    redirection would). ``mode=None`` keeps an existing file's mode and, where permitted,
    its owner, and gives a new file ``0o666 & ~umask``; otherwise the file gets ``mode``.
    Missing parent directories are created. On any error the temp file is removed.
    """
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if mode is None:
        with contextlib.suppress(FileNotFoundError):
            old = target.stat()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8", "surrogateescape"))
            f.flush()
            os.fsync(f.fileno())
        if old is not None:
            os.chmod(tmp, old.st_mode & 0o7777)
            with contextlib.suppress(PermissionError):
                os.chown(tmp, old.st_uid, old.st_gid)
        else:
            os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
