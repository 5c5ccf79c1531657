"""etcd with TLS client certificates and with username/password, for real: certificates
made here with openssl, an etcd that demands them, and the password kept out of logs and
out of `ps`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from pyflannel.config import parse_config
from pyflannel.lease.etcd import EtcdAuthError, EtcdRegistry, EtcdUnavailable
from pyflannel.lease.manager import LeaseManager
from pyflannel.lease.model import LeaseAttrs
from tests.conftest import LoopbackEtcd, enable_auth

ROOT = Path(__file__).resolve().parent.parent
CFG = parse_config('{"Network": "10.1.0.0/16"}')


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path, name: str) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN={name}-ca", "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.crt", cwd=d)
    for who, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                     ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}-{who}.ext").write_text(ext + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout",
                f"{name}-{who}.key", "-out", f"{name}-{who}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}-{who}.csr", "-CA", f"{name}-ca.crt", "-CAkey",
                f"{name}-ca.key", "-CAcreateserial", "-days", "2", "-extfile",
                f"{name}-{who}.ext", "-out", f"{name}-{who}.crt", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    make_pki(d, "good")
    make_pki(d, "other")
    return d


@pytest.fixture(scope="module")
def tls_etcd(pki):
    server = LoopbackEtcd(
        tls_args=["--cert-file", str(pki / "good-server.crt"),
                  "--key-file", str(pki / "good-server.key"),
                  "--client-cert-auth", "--trusted-ca-file", str(pki / "good-ca.crt")],
        ctl_args=[f"--cacert={pki / 'good-ca.crt'}", f"--cert={pki / 'good-client.crt'}",
                  f"--key={pki / 'good-client.key'}"])
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def tls_flags(pki: Path, ca: str = "good") -> dict[str, str]:
    return {"cafile": str(pki / f"{ca}-ca.crt"), "certfile": str(pki / "good-client.crt"),
            "keyfile": str(pki / "good-client.key")}


async def test_leases_over_tls_with_client_certificates(tls_etcd, pki, etcd_prefix):
    reg = EtcdRegistry([tls_etcd.endpoint], etcd_prefix, **tls_flags(pki))
    lease = await LeaseManager(reg, CFG, LeaseAttrs(IPv4Address("198.18.1.1"), "udp")).acquire()
    assert lease.subnet in {x.subnet for x in (await reg.list_leases()).leases}
    await reg.close()


async def test_a_wrong_ca_is_a_clear_error(tls_etcd, pki, etcd_prefix):
    reg = EtcdRegistry([tls_etcd.endpoint], etcd_prefix, timeout=3, **tls_flags(pki, "other"))
    with pytest.raises(EtcdUnavailable) as e:
        await reg.list_leases()
    assert "certificate" in str(e.value).lower() or "ssl" in str(e.value).lower()
    assert "\n" not in str(e.value)
    await reg.close()


def run_status(*flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyflannel", "status", *flags],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def test_status_over_tls_and_its_errors(tls_etcd, pki, etcd_prefix):
    base = [f"-etcd-endpoints={tls_etcd.endpoint}", f"-etcd-prefix={etcd_prefix}"]
    good = run_status(*base, f"-etcd-cafile={pki / 'good-ca.crt'}",
                      f"-etcd-certfile={pki / 'good-client.crt'}",
                      f"-etcd-keyfile={pki / 'good-client.key'}")
    assert good.returncode == 0, good.stderr
    wrong = run_status(*base, f"-etcd-cafile={pki / 'other-ca.crt'}",
                       f"-etcd-certfile={pki / 'good-client.crt'}",
                       f"-etcd-keyfile={pki / 'good-client.key'}")
    assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1
    missing = run_status(*base, "-etcd-cafile=/nonexistent/ca.crt")
    assert missing.returncode == 1 and "-etcd-cafile" in missing.stderr


@pytest.fixture(scope="module")
def auth_etcd():
    server = LoopbackEtcd()
    try:
        server.start()
        enable_auth(server)
        yield server
    finally:
        server.cleanup()


async def test_username_and_password(auth_etcd, etcd_prefix):
    reg = EtcdRegistry([auth_etcd.endpoint], etcd_prefix, username="flannel",
                       password="s3cret-Flannel")
    assert (await LeaseManager(reg, CFG, LeaseAttrs(IPv4Address("198.18.1.2"))).acquire())
    await reg.close()
    bad = EtcdRegistry([auth_etcd.endpoint], etcd_prefix, username="flannel", password="nope")
    with pytest.raises(EtcdAuthError) as e:
        await bad.list_leases()
    assert "nope" not in str(e.value)
    await bad.close()


def test_the_password_never_shows_in_errors_or_in_ps(auth_etcd, etcd_prefix):
    base = [f"-etcd-endpoints={auth_etcd.endpoint}", f"-etcd-prefix={etcd_prefix}",
            "-etcd-username=flannel"]
    wrong = run_status(*base, "-etcd-password=wr0ng-Pass")
    assert wrong.returncode == 1 and "credentials" in wrong.stderr
    assert "wr0ng-Pass" not in wrong.stderr + wrong.stdout
    watch = subprocess.Popen([sys.executable, "-m", "pyflannel", "status", "--watch=0.5", *base,
                              "-etcd-password=s3cret-Flannel"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(2)
        cmdline = Path(f"/proc/{watch.pid}/cmdline").read_bytes()
        assert b"-etcd-password=" in cmdline and b"s3cret-Flannel" not in cmdline
        ps = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(watch.pid)],
                            capture_output=True, text=True).stdout
        assert "s3cret-Flannel" not in ps
    finally:
        watch.terminate()
        out, err = watch.communicate(timeout=10)
    assert b"s3cret-Flannel" not in out + err
    env_only = run_status(*base, env={"FLANNELD_ETCD_PASSWORD": "s3cret-Flannel"})
    assert env_only.returncode == 0, env_only.stderr
