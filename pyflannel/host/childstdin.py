"""A child process's stdin as a file written before the child starts.

A pipe fed while the child runs breaks when the child exits without reading all of it
(``nft`` refusing a ruleset at its first line, an operator's command that ignores its
input): uvloop then raises RuntimeError from the write, not the child's own error. A memfd
holds the whole input up front, so the child reads what it wants and we never write to it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stdin_file(data: bytes) -> Iterator[int]:
    """A file descriptor positioned at the start of ``data``, to pass as ``stdin=``; closed
    on exit (the child keeps its own copy)."""
    fd = os.memfd_create("pyflannel-stdin", 0)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)
