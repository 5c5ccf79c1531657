"""The delegate configs of running pods, one file per container under ``dataDir``.

DEL must undo exactly what ADD did, even when subnet.env changed in between (a new lease,
another MTU) or pyflanneld is down; so ADD saves the config it handed over and DEL hands
the same bytes over again. The file is written before the delegate runs, so a runtime's
DEL after a half-done ADD still cleans up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

from pyflannel.cni.errors import DECODING_FAILURE, INVALID_ENVIRONMENT, IO_FAILURE, CniError
from pyflannel.host.atomicfile import write_atomic

# The spec's CNI_CONTAINERID: an alphanumeric first, then alphanumerics, "_", "." or "-".
# That also makes it a safe file name (no "/", never "." or "..").
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")


def check_container_id(container_id: str) -> None:
    if not _CONTAINER_ID.match(container_id):
        raise CniError(INVALID_ENVIRONMENT, f"CNI_CONTAINERID {container_id!r} is not a "
                       "valid container ID (letters, digits, '_', '.', '-')")


class DelegateStore:
    """Saved delegate configs keyed by container ID."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)

    def path(self, container_id: str) -> Path:
        check_container_id(container_id)
        return self.data_dir / container_id

    def save(self, container_id: str, delegate: dict[str, Any]) -> None:
        path = self.path(container_id)
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(path, json.dumps(delegate), mode=0o600)
        except OSError as e:
            raise CniError(IO_FAILURE, f"cannot save the delegate config {path}: "
                           f"{e.strerror or e}") from None

    def load(self, container_id: str) -> dict[str, Any] | None:
        """The saved config, or None if there is none (never added, or already deleted)."""
        path = self.path(container_id)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CniError(IO_FAILURE, f"cannot read the delegate config {path}: "
                           f"{e.strerror or e}") from None
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
            raise CniError(DECODING_FAILURE, f"the saved delegate config {path} is not a "
                           "delegate config; remove it by hand to let DEL finish")
        return doc

    def remove(self, container_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(container_id))
