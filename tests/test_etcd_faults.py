"""Issue 9's first list, each case against a real etcd 3.4: expired auth tokens, hostile and
oversized content under ``subnets/``, and losing the lease when the pool is full."""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address, IPv4Network

import pytest

from pyflannel.config import parse_config
from pyflannel.lease.etcd import EtcdRegistry
from pyflannel.lease.manager import LeaseManager
from pyflannel.lease.model import LeaseAttrs, subnet_key
from tests.conftest import LoopbackEtcd, _need, enable_auth, until

CFG = parse_config(b'{"Network":"10.1.0.0/16","SubnetLen":24}')
SMALL = parse_config(b'{"Network":"10.1.0.0/22","SubnetLen":24}')


def node(i: int) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(f"198.18.0.{i}"), "udp")


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(LeaseManager, "retry_first_s", 0.05)
    monkeypatch.setattr(LeaseManager, "retry_ceiling_s", 0.5)


def tracebacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info]


class Running:
    """A manager with its watch and renewal tasks, as the daemon runs it."""

    def __init__(self, m: LeaseManager) -> None:
        self.m = m
        self.programmed: list[IPv4Network] = []
        self.torn_down: list[IPv4Network] = []
        m.on_lease = self._on_lease
        m.on_lease_lost = self._on_lost
        self.tasks: list[asyncio.Task] = []

    async def _on_lease(self, lease) -> None:
        self.programmed.append(lease.subnet)

    async def _on_lost(self, old) -> None:
        self.torn_down.append(old.subnet)

    async def start(self, previous=None):
        lease = await self.m.acquire(previous)
        self.m.activated(lease)
        self.tasks = [asyncio.create_task(self.m.watch_forever()),
                      asyncio.create_task(self.m.renew_forever())]
        return lease

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.m.registry.close()


# -- 1. expired auth tokens ---------------------------------------------------------------


@pytest.fixture
def short_token_etcd():
    import shutil

    _need(None if shutil.which("etcd") else "etcd not installed")
    server = LoopbackEtcd(tls_args=None)
    server.tls_args = ["--auth-token=simple", "--auth-token-ttl=3"]
    try:
        server.start()
        enable_auth(server)
        yield server
    finally:
        server.cleanup()


async def test_an_expired_auth_token_is_renewed_and_the_lease_taken_again(short_token_etcd,
                                                                         etcd_prefix, caplog):
    reg = EtcdRegistry([short_token_etcd.endpoint], etcd_prefix, username="flannel",
                       password="s3cret-Flannel")
    run = Running(LeaseManager(reg, CFG, node(1)))
    first = await run.start()
    await asyncio.sleep(5)  # idle: the token expires
    short_token_etcd.etcdctl("del", subnet_key(etcd_prefix, first.subnet))
    await until(lambda: run.m.holds_subnet() and run.programmed, timeout=15)
    assert reg.reauthentications >= 1 and reg.errors >= 1
    assert not tracebacks(caplog)
    await run.stop()


async def test_a_restarted_etcd_forgets_tokens_and_the_node_carries_on(short_token_etcd,
                                                                      etcd_prefix, caplog):
    reg = EtcdRegistry([short_token_etcd.endpoint], etcd_prefix, username="flannel",
                       password="s3cret-Flannel")
    run = Running(LeaseManager(reg, CFG, node(2)))
    first = await run.start()
    short_token_etcd.stop()
    short_token_etcd.start()
    short_token_etcd.etcdctl("del", subnet_key(etcd_prefix, first.subnet))
    await until(lambda: run.m.holds_subnet() and run.programmed, timeout=30)
    assert not tracebacks(caplog)
    await run.stop()


# -- 2. a malformed value at the preferred subnet's key ------------------------------------


async def test_a_malformed_value_at_the_preferred_key_starts_the_node_elsewhere(
        etcd_server, etcd_prefix, caplog):
    key = subnet_key(etcd_prefix, IPv4Network("10.1.5.0/24"))
    etcd_server.etcdctl("put", key, "notjson")
    reg = EtcdRegistry([etcd_server.endpoint], etcd_prefix)
    m = LeaseManager(reg, CFG, node(1))
    lease = await asyncio.wait_for(m.acquire(previous=IPv4Network("10.1.5.0/24")), 10)
    assert lease.subnet != IPv4Network("10.1.5.0/24")
    await m.resync()
    said = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert len(said) == 1 and "counts as taken" in said[0]
    assert not any("taken by another node meanwhile" in r.getMessage() for r in caplog.records)
    await reg.close()


# -- 3. losing the lease when the pool is full ---------------------------------------------


async def test_a_full_pool_after_losing_the_lease_waits_then_recovers(etcd_server, etcd_prefix,
                                                                     caplog):
    regs = [EtcdRegistry([etcd_server.endpoint], etcd_prefix) for _ in range(3)]
    runs = [Running(LeaseManager(r, SMALL, node(i + 1))) for i, r in enumerate(regs)]
    leases = [await r.start() for r in runs]
    me = runs[0]
    # another host's lease over ours: the three subnets are now all taken
    etcd_server.etcdctl("put", subnet_key(etcd_prefix, leases[0].subnet),
                        node(9).to_json())
    await until(lambda: me.torn_down == [leases[0].subnet], timeout=15)
    await asyncio.sleep(1.5)
    assert me.m.lease is None and not me.m.holds_subnet()
    errors = [r.getMessage() for r in caplog.records if "cannot take a lease" in r.getMessage()]
    assert len(errors) == 1 and "no free subnet" in errors[0]
    assert not tracebacks(caplog)
    leases_out = etcd_server.etcdctl("lease", "list").stdout
    assert f"{leases[0].lease_id:x}" not in leases_out  # revoked, not left for a day
    await runs[2].stop()
    etcd_server.etcdctl("del", subnet_key(etcd_prefix, leases[2].subnet))
    await until(lambda: me.m.holds_subnet(), timeout=15)
    assert me.m.lease.subnet == leases[2].subnet
    await runs[0].stop()
    await runs[1].stop()


async def test_a_create_that_loses_its_race_leaves_no_etcd_lease(etcd_server, etcd_prefix):
    reg = EtcdRegistry([etcd_server.endpoint], etcd_prefix)
    before = set(etcd_server.etcdctl("lease", "list").stdout.split())
    etcd_server.etcdctl("put", subnet_key(etcd_prefix, IPv4Network("10.1.7.0/24")), "{}")
    assert await reg.create(IPv4Network("10.1.7.0/24"), node(1), 60) is None
    assert set(etcd_server.etcdctl("lease", "list").stdout.split()) == before
    await reg.close()


# -- 5. keys that are not subnets ----------------------------------------------------------


async def test_keys_that_are_not_subnets_are_named_once_each(etcd_server, etcd_prefix, caplog):
    for name in ("hello", "10.1.1.0-99", "10.1.2.0-24-extra"):
        etcd_server.etcdctl("put", f"{etcd_prefix}/subnets/{name}", "{}")
    reg = EtcdRegistry([etcd_server.endpoint], etcd_prefix)
    run = Running(LeaseManager(reg, CFG, node(1)))
    await run.start()
    etcd_server.etcdctl("put", f"{etcd_prefix}/subnets/hello", "again")  # via the watch
    etcd_server.etcdctl("put", f"{etcd_prefix}/subnets/bye", "{}")
    await until(lambda: any("subnets/bye" in r.getMessage() for r in caplog.records), 15)
    for name in ("hello", "10.1.1.0-99", "10.1.2.0-24-extra", "bye"):
        said = [r for r in caplog.records if r.levelno == logging.WARNING
                and r.getMessage().startswith(f"ignoring key {etcd_prefix}/subnets/{name}:")]
        assert len(said) == 1, name
    await run.stop()


# -- 6. more than a gRPC message of values under subnets/ ----------------------------------


async def test_six_mebibytes_under_subnets_do_not_stop_a_new_node(etcd_server, etcd_prefix,
                                                                  caplog):
    import os
    import subprocess

    blob = "x" * (1024 * 1024)
    for i in range(6):
        key = subnet_key(etcd_prefix, IPv4Network(f"10.1.{100 + i}.0/24"))
        subprocess.run(["etcdctl", f"--endpoints={etcd_server.endpoint}", "put", key],
                       input=blob, text=True, check=True, capture_output=True,
                       env={**os.environ, "ETCDCTL_API": "3"})
    reg = EtcdRegistry([etcd_server.endpoint], etcd_prefix, max_message=4 * 1024 * 1024)
    m = LeaseManager(reg, CFG, node(1))
    lease = await asyncio.wait_for(m.acquire(previous=IPv4Network("10.1.100.0/24")), 20)
    assert lease.subnet != IPv4Network("10.1.100.0/24")
    huge = [r for r in caplog.records if "far larger than any lease" in r.getMessage()]
    assert len(huge) == 6
    listing = await reg.list_leases()
    assert len(listing.rejected) == 6 and [x.subnet for x in listing.leases] == [lease.subnet]
    await reg.close()
