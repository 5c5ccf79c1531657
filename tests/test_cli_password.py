"""An etcd password given on the command line never shows in `ps`, whichever command takes it,
and a username without a password (or the reverse) is one line, not a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyflannel.cli import etcd_password_given

ROOT = Path(__file__).resolve().parent.parent
SECRET = "pol1cy-Secret"


@pytest.mark.parametrize("argv", [
    ["-etcd-password=" + SECRET],
    ["--etcd-password=" + SECRET],
    ["list", "-etcd-password", SECRET],
    ["--etcd-password", SECRET, "-etcd-username=u"],
])
def test_every_form_of_the_flag_is_found(argv):
    assert etcd_password_given(argv) == SECRET


def test_no_password_or_one_after_the_end_of_flags_is_nothing():
    assert etcd_password_given(["list", "-etcd-username=u"]) == ""
    assert etcd_password_given(["--", "-etcd-password=x"]) == ""
    assert etcd_password_given(["-etcd-password"]) == ""


@pytest.fixture
def silent_etcd():
    """A loopback port that takes connections and never answers, so a command waits on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("command", [["policy", "list"], ["config", "get"], ["lease", "list"],
                                     ["status"]])
def test_the_password_leaves_the_command_line_of_every_command(silent_etcd, command):
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyflannel", *command, f"-etcd-endpoints={silent_etcd}",
         "-etcd-username=flannel", f"-etcd-password={SECRET}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        hidden = False
        deadline = time.monotonic() + 10
        while not hidden and proc.poll() is None and time.monotonic() < deadline:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            hidden = b"-etcd-password=" in cmdline and SECRET.encode() not in cmdline
            time.sleep(0.005)
        assert hidden, "the password stayed on the command line while the command ran"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("flags", [["-etcd-password=x"], ["-etcd-username=u"]])
@pytest.mark.parametrize("command", [["policy", "list"], ["config", "get"], ["run"]])
def test_a_username_or_password_alone_is_one_line(flags, command):
    out = subprocess.run([sys.executable, "-m", "pyflannel", *command,
                          "-etcd-endpoints=http://127.0.0.1:9", *flags],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().endswith(
        "flags -etcd-username and -etcd-password go together: give both or neither")
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
