"""The subnet file: one atomic writer, and a writability check before anything is set up."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from pyflannel.host.atomicfile import write_atomic
from pyflannel.host.subnetfile import (
    SubnetEnv,
    SubnetFileError,
    check_writable,
    previous_subnet,
    write_subnet_file,
)
from tests.conftest import _need

ROOT = Path(__file__).resolve().parent.parent


def test_a_writable_path_passes_and_leaves_nothing_behind(tmp_path):
    check_writable(tmp_path / "subnet.env")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_directory_is_created_and_left_empty(tmp_path):
    path = tmp_path / "run" / "flannel" / "subnet.env"
    check_writable(path)
    assert path.parent.is_dir() and list(path.parent.iterdir()) == []


def test_an_existing_file_is_left_alone(tmp_path):
    path = tmp_path / "subnet.env"
    path.write_text("FLANNEL_SUBNET=10.1.5.1/24\n")
    check_writable(path)
    assert path.read_text() == "FLANNEL_SUBNET=10.1.5.1/24\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subnet.env"]


def test_a_parent_that_is_a_regular_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(SubnetFileError) as err:
        check_writable(tmp_path / "run" / "flannel" / "subnet.env")
    message = str(err.value)
    assert "\n" not in message and f"{tmp_path / 'run'} is not a directory" in message
    assert isinstance(err.value, ValueError)


def test_a_path_that_is_a_directory_is_refused(tmp_path):
    (tmp_path / "subnet.env").mkdir()
    with pytest.raises(SubnetFileError, match="is a directory"):
        check_writable(tmp_path / "subnet.env")


CHECK = "import sys; from pyflannel.host.subnetfile import check_writable as c; c(sys.argv[1])"


def test_a_read_only_directory_is_refused(tmp_path):
    """Root ignores mode bits, so for root the directory is a read-only bind mount (in a
    private mount namespace, gone when the command ends); others get a 0555 directory."""
    ro = tmp_path / "ro"
    ro.mkdir()
    target = ro / "subnet.env"
    if os.geteuid() != 0:
        ro.chmod(0o555)
        try:
            with pytest.raises(SubnetFileError, match="Permission denied"):
                check_writable(target)
        finally:
            ro.chmod(0o755)
        return
    _need(None if shutil.which("unshare") and shutil.which("mount")
          else "unshare/mount not installed (util-linux)")
    script = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
              f'exec {sys.executable} -c "{CHECK}" {target}')
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("pyflannel.host.subnetfile.SubnetFileError: cannot write subnet")
    assert "Read-only file system" in last
    assert list(ro.iterdir()) == []


def test_the_subnet_file_is_written_atomically_with_mode_0644(tmp_path):
    path = tmp_path / "flannel" / "subnet.env"
    env = SubnetEnv(IPv4Network("10.1.0.0/16"), IPv4Interface("10.1.5.1/24"), 1472, False)
    write_subnet_file(path, env)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert previous_subnet(path) == IPv4Network("10.1.5.0/24")
    assert sorted(p.name for p in path.parent.iterdir()) == ["subnet.env"]


def test_write_atomic_keeps_mode_when_asked_and_removes_its_temp_file_on_error(tmp_path):
    path = tmp_path / "opts"
    path.write_text("old")
    path.chmod(0o600)
    write_atomic(path, "new", mode=None)
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(AttributeError):
        write_atomic(path, b"not text")  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opts"]
