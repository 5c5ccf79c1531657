"""Shared fixtures: a real etcd on loopback for control-plane tests, and the lab gate.

Tests that need root, namespaces or etcd are not skipped in CI (CI=true): there a missing
tool is a failure, so a green run always means the real thing was exercised.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from pyflannel.lab import require_root_and_tools


def _need(reason: str | None) -> None:
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test, but: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackEtcd:
    """An etcd process on 127.0.0.1 with free ports, for tests run from this namespace."""

    def __init__(self, tls_args: list[str] | None = None,
                 ctl_args: list[str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pyflannel-etcd-"))
        self.client_port, self.peer_port = _free_port(), _free_port()
        scheme = "https" if tls_args else "http"
        self.endpoint = f"{scheme}://127.0.0.1:{self.client_port}"
        self.tls_args = tls_args or []
        self.ctl_args = ctl_args or []  # etcdctl's TLS flags
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.dir / "etcd.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(self.dir / "data"),
             "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}", "--log-level", "warn", *self.tls_args],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), 0.2):
                    pass
                if self.etcdctl("endpoint", "health", check=False).returncode == 0:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("etcd did not start: " + (self.dir / "etcd.log").read_text()[-2000:])

    def etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["etcdctl", f"--endpoints={self.endpoint}", *self.ctl_args, *args],
            capture_output=True,
            text=True, check=check, env={**os.environ, "ETCDCTL_API": "3"}, timeout=20,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def enable_auth(server: LoopbackEtcd) -> None:
    """Users root and flannel (read-write on everything, password s3cret-Flannel), auth on;
    etcdctl then acts as root."""
    server.etcdctl("user", "add", "root", "--new-user-password=r00t-pw")
    server.etcdctl("user", "add", "flannel", "--new-user-password=s3cret-Flannel")
    server.etcdctl("role", "add", "flannel")
    server.etcdctl("role", "grant-permission", "flannel", "--prefix=true", "readwrite", "/")
    server.etcdctl("user", "grant-role", "flannel", "flannel")
    server.etcdctl("auth", "enable")
    server.ctl_args = ["--user=root:r00t-pw"]


async def until(cond, timeout: float = 5.0, step: float = 0.01) -> None:
    """Wait in the running loop until ``cond()`` holds; fail after ``timeout`` seconds."""
    import asyncio

    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(step)


@pytest.fixture(scope="session")
def etcd_server():
    _need(None if shutil.which("etcd") and shutil.which("etcdctl")
          else "etcd/etcdctl not installed (apt-get install etcd-server etcd-client)")
    server = LoopbackEtcd()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def etcd_prefix() -> str:
    """A fresh key prefix per test, so tests share one etcd without seeing each other."""
    return f"/pftest-{uuid.uuid4().hex[:8]}/network"


@pytest.fixture
def lab_ready():
    _need(require_root_and_tools())
