"""The extension backend's contract with the operator's commands (flanneld v0.20.2's, plus a
timeout and retries), and the alloc backend's lease: real ``sh -c`` commands, no devices."""

from __future__ import annotations

import asyncio
import json
import logging
from ipaddress import IPv4Address

import pytest

from pyflannel.backend import make_backend
from pyflannel.backend.base import BackendError
from pyflannel.backend.extension import ExtensionBackend, run_command
from pyflannel.config import ConfigError, parse_config
from pyflannel.host.netlink import ExternalInterface
from pyflannel.lease.model import Lease, LeaseAttrs
from tests.conftest import until

EXT = ExternalInterface("eth0", 2, IPv4Address("198.18.0.1"), IPv4Address("198.18.0.1"), 1400)


def config(**commands) -> str:
    return json.dumps({"Network": "10.1.0.0/16",
                       "Backend": {"Type": "extension", **commands}})


def backend(**commands) -> ExtensionBackend:
    b = make_backend(parse_config(config(**commands)), EXT)
    assert isinstance(b, ExtensionBackend)
    return b


def own_lease(attrs: LeaseAttrs) -> Lease:
    return Lease.from_kv("10.1.5.0-24", attrs.to_json())


def peer(subnet: str, ip: str, data: object = "peer-data", btype: str = "extension") -> Lease:
    doc = {"PublicIP": ip, "PublicIPv6": None, "BackendType": btype}
    if data is not None:
        doc["BackendData"] = data
    return Lease.from_kv(subnet.replace("/", "-"), json.dumps(doc))


async def started(b: ExtensionBackend) -> ExtensionBackend:
    b.lease = own_lease(await b.prepare())
    await b.commit()
    return b


async def settle(b: ExtensionBackend) -> None:
    await until(lambda: b._worker is not None and b._worker.done(), 10)


async def test_prestartup_output_is_the_leases_backend_data_as_a_json_string():
    b = backend(PreStartupCommand="echo '  {\"vtep\": \"aa:bb\"}  '; echo warn >&2")
    attrs = await b.prepare()
    # stdout and stderr combined, trimmed at both ends, stored as one JSON string
    assert attrs.backend_data == '{"vtep": "aa:bb"}  \nwarn'
    assert attrs.to_json().endswith(',"BackendType":"extension",'
                                    '"BackendData":"{\\"vtep\\": \\"aa:bb\\"}  \\nwarn"}')
    assert b.mtu == 1400  # the external MTU: the commands decide the encapsulation


async def test_no_prestartup_command_means_no_backend_data():
    attrs = await backend().prepare()
    assert json.loads(attrs.to_json()) == {"PublicIP": "198.18.0.1", "PublicIPv6": None,
                                           "BackendType": "extension"}


async def test_a_failing_prestartup_command_stops_start_up_with_its_code_and_output():
    with pytest.raises(BackendError, match=r"PreStartupCommand exited 3: no vtep"):
        await backend(PreStartupCommand="echo no vtep >&2; exit 3").prepare()


async def test_poststartup_gets_network_subnet_and_public_ip(tmp_path):
    out = tmp_path / "post"
    b = await started(backend(
        PostStartupCommand=f'echo "$NETWORK $SUBNET $PUBLIC_IP" > {out}'))
    await settle(b)
    assert out.read_text() == "10.1.0.0/16 10.1.5.0/24 198.18.0.1\n"
    assert not b.data_path_behind()


async def test_subnet_add_gets_the_peers_env_and_backend_data_on_stdin(tmp_path):
    out = tmp_path / "add"
    b = await started(backend(SubnetAddCommand=f'{{ echo "$SUBNET $PUBLIC_IP"; cat; }} >> {out}'))
    await b.add_peer(peer("10.1.7.0/24", "198.18.0.7", "line1\nline2"))
    await b.commit()
    await settle(b)
    assert out.read_text() == "10.1.7.0/24 198.18.0.7\nline1\nline2\n"  # stdin ends "\n"


async def test_subnet_remove_gets_the_departed_peers_env_and_data(tmp_path):
    out = tmp_path / "remove"
    b = await started(backend(SubnetAddCommand="true",
                              SubnetRemoveCommand=f'{{ echo "$SUBNET $PUBLIC_IP"; cat; }} > {out}'))
    p = peer("10.1.7.0/24", "198.18.0.7", "d")
    await b.add_peer(p)
    await b.commit()
    await settle(b)
    await b.remove_peer(p)
    await b.commit()
    await settle(b)
    assert out.read_text() == "10.1.7.0/24 198.18.0.7\nd\n"
    assert b.applied == {}


async def test_a_renewal_runs_nothing_but_a_changed_lease_runs_subnet_add_again(tmp_path):
    out = tmp_path / "add"
    b = await started(backend(SubnetAddCommand=f'echo "$PUBLIC_IP" >> {out}'))
    await b.add_peer(peer("10.1.7.0/24", "198.18.0.7"))
    await b.commit()
    await settle(b)
    renewed = Lease.from_kv("10.1.7.0-24", peer("10.1.7.0/24", "198.18.0.7").attrs.to_json(),
                            lease_id=99, mod_revision=42)
    await b.add_peer(renewed)
    await b.commit()
    await settle(b)
    await b.add_peer(peer("10.1.7.0/24", "198.18.0.8"))
    await b.commit()
    await settle(b)
    assert out.read_text().split() == ["198.18.0.7", "198.18.0.8"]


async def test_leases_of_other_backends_and_non_string_data_are_ignored_with_why(tmp_path):
    out = tmp_path / "add"
    b = await started(backend(SubnetAddCommand=f'echo "$SUBNET" >> {out}'))
    for p in (peer("10.1.7.0/24", "198.18.0.7", None, btype="vxlan"),
              peer("10.1.8.0/24", "198.18.0.8", {"VtepMAC": "x"}),
              peer("10.1.9.0/24", "198.18.0.9", None)):
        await b.add_peer(p)
    await b.commit()
    await settle(b)
    assert out.read_text() == "10.1.9.0/24\n"  # no BackendData: an empty stdin line
    problems = b.peer_problems()
    assert "'vxlan', not 'extension'" in problems["10.1.7.0-24"]
    assert "not a JSON string" in problems["10.1.8.0-24"]
    assert set(problems) == {"10.1.7.0-24", "10.1.8.0-24"}


async def test_a_failing_command_is_one_log_line_and_is_retried_on_the_next_reconcile(
        tmp_path, caplog):
    flag = tmp_path / "works"
    b = await started(backend(
        SubnetAddCommand=f'test -e {flag} || {{ echo "no route to $SUBNET" >&2; exit 2; }}'))
    await b.add_peer(peer("10.1.7.0/24", "198.18.0.7"))
    with caplog.at_level(logging.ERROR, "pyflannel"):
        await b.commit()
        await settle(b)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lines == ["peer 10.1.7.0/24 (198.18.0.7): SubnetAddCommand exited 2: "
                     "no route to 10.1.7.0/24; will retry"]
    assert b.peer_problems() == {"10.1.7.0-24": "SubnetAddCommand exited 2: "
                                                "no route to 10.1.7.0/24"}
    flag.touch()
    await b.reconcile_all()
    await settle(b)
    assert b.peer_problems() == {}
    assert "10.1.7.0-24" in b.applied


async def test_poststartup_failure_keeps_the_node_unready_until_a_retry_succeeds(tmp_path):
    flag = tmp_path / "works"
    b = await started(backend(PostStartupCommand=f"test -e {flag}"))
    await settle(b)
    assert b.data_path_behind()
    flag.touch()
    await b.reconcile_all()
    await settle(b)
    assert not b.data_path_behind()


async def test_a_hung_command_is_killed_at_its_timeout_with_its_children():
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    result = await run_command("sleep 30 & sleep 30", {}, "", 0.3)
    assert result.code is None and "no exit within 0.3s" in result.describe()
    assert loop.time() - t0 < 3  # the background sleep did not hold the pipe open


async def test_commit_never_waits_for_a_slow_command():
    b = await started(backend(SubnetAddCommand="sleep 5", CommandTimeout=10))
    await b.add_peer(peer("10.1.7.0/24", "198.18.0.7"))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await b.commit()
    await b.reconcile_all()
    assert loop.time() - t0 < 0.5
    await b.teardown()  # kills the running command


def test_config_rules_for_the_commands():
    with pytest.raises(ConfigError, match=r"Backend.SubnetAddCommand must be a string"):
        parse_config(config(SubnetAddCommand=["ip", "route"]))
    with pytest.raises(ConfigError, match=r"Backend.CommandTimeout 0 is out of range"):
        parse_config(config(CommandTimeout=0))
    cfg = parse_config(config(subnetaddcommand="true"))  # Go's case-insensitive fields
    assert cfg.backend_option("SubnetAddCommand") == "true"


async def test_alloc_publishes_only_its_address_and_uses_the_external_mtu():
    cfg = parse_config('{"Network": "10.1.0.0/16", "Backend": {"Type": "alloc"}}')
    b = make_backend(cfg, EXT)
    attrs = await b.prepare()
    # flanneld's alloc lease: PublicIP only (no BackendType, no BackendData)
    assert attrs.to_json() == '{"PublicIP":"198.18.0.1","PublicIPv6":null}'
    assert b.mtu == 1400
    # other alloc nodes' leases read as udp (no BackendType): no warning about each
    assert b.takes_foreign_lease(peer("10.1.7.0/24", "198.18.0.7", None, btype=""))


async def test_a_command_that_exits_without_reading_stdin_is_no_error():
    """The peer's data is written before the command starts: nothing writes to a pipe the
    command already closed (under uvloop that raised instead of running the command)."""
    import uvloop

    async def many() -> list:
        data = "x" * 100_000  # more than a pipe holds
        return [await run_command("exit 0", {}, data, 5) for _ in range(60)]

    results = await asyncio.get_running_loop().run_in_executor(
        None, lambda: uvloop.run(many()))
    assert all(r.ok for r in results)
