"""Run a delegate plugin as a runtime would: found on CNI_PATH, the same CNI_* environment,
its config on stdin, its result (or its error JSON) on stdout."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyflannel.cni.errors import INTERNAL, INVALID_ENVIRONMENT, CniError


def find_plugin(plugin_type: str, cni_path: str) -> Path:
    """The first executable named ``plugin_type`` in the CNI_PATH directories."""
    if "/" in plugin_type or plugin_type in {"", ".", ".."}:
        raise CniError(INVALID_ENVIRONMENT, f"delegate type {plugin_type!r} is not a plugin name")
    dirs = [d for d in cni_path.split(os.pathsep) if d]
    for directory in dirs:
        candidate = Path(directory) / plugin_type
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(INVALID_ENVIRONMENT,
                   f"delegate plugin {plugin_type!r} not found in CNI_PATH "
                   f"({cni_path or 'empty'}); install containernetworking-plugins "
                   "or put its directory on CNI_PATH")


def run_delegate(plugin_type: str, config: Mapping[str, Any], environ: Mapping[str, str],
                 command: str) -> str:
    """Run the delegate for ``command``; its stdout on success, CniError otherwise."""
    binary = find_plugin(plugin_type, environ.get("CNI_PATH", ""))
    env = {**environ, "CNI_COMMAND": command}
    try:
        proc = subprocess.run([str(binary)], input=json.dumps(config).encode(), env=env,
                              stdout=subprocess.PIPE, check=False)
    except OSError as e:
        raise CniError(INTERNAL, f"cannot run delegate {binary}: {e.strerror or e}") from None
    out = proc.stdout.decode(errors="replace")
    if proc.returncode == 0:
        return out
    raise _delegate_error(plugin_type, proc.returncode, out)


def _delegate_error(plugin_type: str, returncode: int, out: str) -> CniError:
    """The delegate's own error (code and details kept, its name put before the message)
    when it wrote CNI error JSON, else an error that says it did not."""
    try:
        doc = json.loads(out)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("code"), int) and isinstance(
            doc.get("msg"), str):
        return CniError(doc["code"], f"{plugin_type}: {doc['msg']}", str(doc.get("details", "")))
    return CniError(INTERNAL, f"delegate {plugin_type} failed with exit status {returncode} "
                    "and no CNI error", out.strip()[-500:])
