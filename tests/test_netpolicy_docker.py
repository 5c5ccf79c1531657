"""Docker containers as policy endpoints: the watcher follows dockerd's event stream over
its unix socket (a fake dockerd here), and a container's labels cover its own addresses,
winning over its node's labels on the same key."""

import asyncio
import json
import logging
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_address
from urllib.parse import unquote

from pyflannel.backoff import Backoff
from pyflannel.flags import parse_flags
from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.policy import nft
from pyflannel.policy.docker import Container, DockerWatcher, container_from_inspect
from pyflannel.policy.keeper import PolicyBook, build_model, container_workloads
from pyflannel.policy.verdict import Flow, trace

RED_ONLY = {"Name": "red-only", "Selector": "tenant == 'red'",
            "Ingress": [{"Action": "Allow", "Source": {"Selector": "tenant == 'red'"}}]}


def inspect_doc(cid: str, ip: str, running: bool = True, **labels) -> dict:
    return {"Id": cid, "Name": f"/c-{cid}", "State": {"Running": running},
            "Config": {"Labels": labels},
            "NetworkSettings": {"IPAddress": ip, "GlobalIPv6Address": "",
                                "Networks": {"bridge": {"IPAddress": ip,
                                                        "GlobalIPv6Address": "bad"}}}}


class FakeDockerd:
    """dockerd's API on a unix socket: the container list, inspect, and a chunked event
    stream that the test feeds."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.docs: dict[str, dict] = {}
        self.streams: list[asyncio.StreamWriter] = []
        self.event_paths: list[str] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self.serve, self.path)

    async def stop(self) -> None:
        """dockerd goes away: the socket closes and so do the open event streams."""
        assert self.server is not None
        self.server.close()
        for w in self.streams:
            w.close()
        self.streams.clear()
        await self.server.wait_closed()

    async def serve(self, reader, writer) -> None:
        path = (await reader.readline()).split()[1].decode()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        if path.startswith("/events"):
            self.event_paths.append(unquote(path))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            self.streams.append(writer)
            return  # left open: events are written by send()
        if path == "/containers/json":
            body = json.dumps([{"Id": cid} for cid, d in self.docs.items()
                               if d["State"]["Running"]]).encode()
        elif path.startswith("/containers/") and path[12:-5] in self.docs:
            body = json.dumps(self.docs[path[12:-5]]).encode()
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        writer.close()

    def send(self, cid: str, action: str) -> None:
        event = json.dumps({"Type": "container", "Action": action, "Actor": {"ID": cid}})
        half = len(event) // 2  # one event across two chunks
        for part in (event[:half], event[half:] + "\n"):
            for w in self.streams:
                w.write(b"%x\r\n%s\r\n" % (len(part), part.encode()))


async def until(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def addresses(w: DockerWatcher) -> dict[str, list[str]]:
    return {c.name: [str(a) for a in c.addresses] for c in w.containers.values()}


def test_the_watcher_lists_then_follows_container_events(tmp_path):
    async def main() -> None:
        dockerd = FakeDockerd(str(tmp_path / "docker.sock"))
        dockerd.docs["a"] = inspect_doc("a", "10.1.1.2", tenant="red")
        dockerd.docs["old"] = inspect_doc("old", "10.1.1.9", running=False)
        await dockerd.start()
        changes = []
        w = DockerWatcher(dockerd.path, lambda: changes.append(1))
        task = asyncio.create_task(w.run())
        await asyncio.wait_for(w.connected.wait(), 5)
        assert dockerd.event_paths == ['/events?filters={"type": ["container"]}']
        assert addresses(w) == {"c-a": ["10.1.1.2"]} and changes == [1]
        assert w.containers["a"].labels == {"tenant": "red"}
        dockerd.docs["b"] = inspect_doc("b", "10.1.1.3", tenant="blue")
        dockerd.send("b", "start")
        await until(lambda: "c-b" in addresses(w))
        dockerd.docs["a"]["State"]["Running"] = False
        dockerd.send("a", "die")
        await until(lambda: "c-a" not in addresses(w))
        del dockerd.docs["b"]
        dockerd.send("b", "destroy")  # inspect answers 404: gone
        await until(lambda: not w.containers)
        assert len(changes) == 4
        task.cancel()
        await dockerd.stop()

    asyncio.run(main())


def test_when_dockerd_goes_away_the_containers_stay_and_it_reconnects(tmp_path, caplog):
    async def main() -> None:
        dockerd = FakeDockerd(str(tmp_path / "docker.sock"))
        dockerd.docs["a"] = inspect_doc("a", "10.1.1.2", tenant="red")
        await dockerd.start()
        w = DockerWatcher(dockerd.path, backoff=Backoff(0.02, 0.05))
        task = asyncio.create_task(w.run())
        await asyncio.wait_for(w.connected.wait(), 5)
        await dockerd.stop()
        await until(lambda: not w.connected.is_set())
        await asyncio.sleep(0.2)  # several failed reconnects
        assert addresses(w) == {"c-a": ["10.1.1.2"]}  # kept while dockerd is away
        dockerd.docs = {"b": inspect_doc("b", "10.1.1.3")}
        await dockerd.start()
        await until(lambda: addresses(w) == {"c-b": ["10.1.1.3"]})
        assert w.connected.is_set()
        task.cancel()
        await dockerd.stop()

    with caplog.at_level(logging.WARNING, "pyflannel"):
        asyncio.run(main())
    said = [r.getMessage() for r in caplog.records]
    assert said and all(s.startswith("policy: Docker containers: ") for s in said)
    assert len(said) <= 2, said  # the stream's end, then one line for the refused connects


def test_inspect_takes_every_good_address_and_ignores_bad_fields():
    c = container_from_inspect(inspect_doc("a", "10.1.1.2", tenant="red"))
    assert c == Container("a", "c-a", (IPv4Address("10.1.1.2"),), {"tenant": "red"})
    assert container_from_inspect(inspect_doc("a", "10.1.1.2", running=False)) is None
    assert container_from_inspect({"State": "garbage"}) is None
    assert container_from_inspect(inspect_doc("a", "")) is None  # no address: no endpoint


def own_lease() -> Lease:
    return Lease(IPv4Network("10.1.1.0/24"), LeaseAttrs(IPv4Address("198.18.0.1"), "host-gw"),
                 7, 1, IPv6Network("fc00:10:1:1::/64"))


def remote_lease() -> Lease:
    return Lease(IPv4Network("10.1.2.0/24"), LeaseAttrs(
        IPv4Address("198.18.0.2"), "host-gw", labels=(("tenant", "red"),)), 7, 1, None)


def red_and_blue_containers() -> list[Container]:
    return [Container("r", "red", (ip_address("10.1.1.2"),), {"tenant": "red"}),
            Container("b", "blue", (ip_address("10.1.1.3"),), {"tenant": "blue", "x": "y z"}),
            Container("h", "host-net", (ip_address("198.18.0.1"),), {"tenant": "red"})]


def test_two_containers_on_one_node_get_different_verdicts_from_the_same_remote():
    book = PolicyBook()
    book.update({"red-only": json.dumps(RED_ONLY).encode()}, {})
    warned = []
    model = build_model(book, [own_lease(), remote_lease()], (own_lease(), {"tenant": "blue"}),
                        lambda key, msg: warned.append(msg), red_and_blue_containers())
    remote = "10.1.2.5"  # a red node's workload
    assert trace(model, Flow.of(remote, "10.1.1.2")).allowed  # the red container
    assert not trace(model, Flow.of("10.1.1.3", "10.1.1.2")).allowed  # blue container to red
    assert trace(model, Flow.of(remote, "10.1.1.3")).allowed  # blue: no policy selects it
    assert warned == ["container blue Labels.x: label value 'y z' is not valid; "
                      "that label is left out"]
    eps = container_workloads(own_lease(), {"tenant": "blue", "zone": "a"},
                              red_and_blue_containers())
    assert [(e.name, e.labels) for e in eps] == [
        ("10.1.1.0-24&fc00:10:1:1::-64/red", {"tenant": "red", "zone": "a"}),
        ("10.1.1.0-24&fc00:10:1:1::-64/blue", {"tenant": "blue", "zone": "a"})]


def test_a_container_that_overrides_a_label_leaves_the_nodes_rule_selector_set():
    """A rule selecting the node's tenant must not match the container relabelled red."""
    blue_peers = {"Name": "blue-peers", "Selector": "tenant == 'blue'",
                  "Ingress": [{"Action": "Allow", "Source": {"Selector": "tenant == 'blue'"}}]}
    book = PolicyBook()
    book.update({"blue-peers": json.dumps(blue_peers).encode()}, {})
    own = own_lease()
    model = build_model(book, [own], (own, {"tenant": "blue"}), None,
                        red_and_blue_containers())
    assert trace(model, Flow.of("10.1.1.3", "10.1.1.4")).allowed  # blue container to node
    assert not trace(model, Flow.of("10.1.1.2", "10.1.1.4")).allowed  # red container: no
    text = nft.compile_ruleset(model, [w for w in model.workloads if w.node]).text
    blue_set = next(line for line in text.splitlines() if "set s0_4" in line)
    assert "10.1.1.3" in blue_set and "10.1.1.2" not in blue_set and "10.1.1.4/30" in blue_set
    # the containers' chains come before the node's in the dispatch
    assert text.index("ip daddr { 10.1.1.2/32 }") < text.index("ip daddr { 10.1.1.0/24 }")


def test_the_docker_socket_flag_has_dockers_default_and_can_be_turned_off():
    assert parse_flags([]).docker_socket == "/var/run/docker.sock"
    assert parse_flags(["-docker-socket="]).docker_socket == ""


def test_a_node_without_docker_says_so_once_at_info_and_follows_it_once_it_appears(
        tmp_path, caplog):
    async def main() -> None:
        dockerd = FakeDockerd(str(tmp_path / "docker.sock"))
        dockerd.docs["a"] = inspect_doc("a", "10.1.1.2")
        w = DockerWatcher(dockerd.path, backoff=Backoff(0.01, 0.02))
        task = asyncio.create_task(w.run())
        await asyncio.sleep(0.1)  # several tries without a socket
        await dockerd.start()
        await asyncio.wait_for(w.connected.wait(), 5)
        assert addresses(w) == {"c-a": ["10.1.1.2"]}
        task.cancel()
        await dockerd.stop()

    with caplog.at_level(logging.INFO, "pyflannel"):
        asyncio.run(main())
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said[0] == ("INFO", f"policy: no Docker socket at {tmp_path}/docker.sock; "
                       "containers are followed once it appears")
    assert [s for s in said[1:] if "Docker socket" in s[1] or s[0] != "INFO"] == []


def test_a_broken_answer_from_dockerd_is_a_docker_error_that_closes_the_socket(tmp_path):
    """An over-long header line (or a reset) mid-answer is retried by the watcher itself
    like any other dockerd trouble, not a task failure; the connection is closed."""
    from pyflannel.policy.docker import MAX_EVENT, DockerError, _Http

    async def main() -> None:
        closed = asyncio.Event()

        async def serve(reader, writer) -> None:
            await reader.readline()
            writer.write(b"HTTP/1.1 200 OK\r\nX: " + b"y" * (MAX_EVENT + 10) + b"\r\n\r\n")
            await reader.read()  # ends when the client closes its side
            closed.set()
            writer.close()

        path = str(tmp_path / "docker.sock")
        server = await asyncio.start_unix_server(serve, path)
        try:
            error = None
            try:
                await _Http(path).open("/events")
            except DockerError as e:
                error = e
            assert error is not None and "broke off" in str(error)
            await asyncio.wait_for(closed.wait(), 5)
        finally:
            server.close()

    asyncio.run(main())
