"""The health port holds no one's connections for long and logs nothing a client sends.

The server runs in-process on 127.0.0.1 with a port the kernel picks.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from pyflannel.metrics import HealthServer, Metrics


def _server(ready: bool = True, **kw) -> HealthServer:
    state = {"backend": "udp", "subnet": "10.1.5.0/24", "ready": ready}
    return HealthServer("127.0.0.1", 0, Metrics(lambda: state), lambda: ready, **kw)


def _port(srv: HealthServer) -> int:
    assert srv.server is not None
    return srv.server.sockets[0].getsockname()[1]


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server ends the connection (EOF or reset) within ``seconds``."""
    try:
        await asyncio.wait_for(reader.read(), seconds)
    except ConnectionError:
        pass
    except TimeoutError:
        return False
    return True


def test_healthz_readyz_metrics_still_answer():
    async def main() -> None:
        for ready, code in ((True, 200), (False, 503)):
            srv = _server(ready)
            await srv.start()
            try:
                assert await _get(_port(srv), "/healthz") == (200, b"ok\n")
                assert (await _get(_port(srv), "/readyz"))[0] == code
                status, body = await _get(_port(srv), "/metrics")
                assert status == 200 and b"pyflannel_ready" in body
                assert await _get(_port(srv), "/healthz", "HEAD") == (200, b"")
                assert (await _get(_port(srv), "/nope"))[0] == 404
                assert (await _get(_port(srv), "/healthz", "POST"))[0] == 405
            finally:
                await srv.close()

    asyncio.run(main())


def test_slowloris_connections_are_closed_at_the_request_deadline():
    """Each sends one header line every 0.2 s, well inside any per-line timeout."""
    async def main() -> None:
        srv = _server(deadline=0.6)
        await srv.start()
        conns = [await asyncio.open_connection("127.0.0.1", _port(srv)) for _ in range(20)]
        stop = asyncio.Event()

        async def trickle(writer: asyncio.StreamWriter) -> None:
            writer.write(b"GET /healthz HTTP/1.1\r\n")
            i = 0
            while not stop.is_set():
                try:
                    writer.write(f"X-Slow-{i}: 1\r\n".encode())
                    await writer.drain()
                except ConnectionError:
                    return
                i += 1
                await asyncio.sleep(0.2)

        tasks = [asyncio.create_task(trickle(w)) for _r, w in conns]
        t0 = time.monotonic()
        try:
            closed = await asyncio.gather(*(_closed_within(r, 3) for r, _w in conns))
            assert all(closed), f"{closed.count(False)} of 20 kept open"
            assert time.monotonic() - t0 < 2.5
            assert srv.active == 0
            assert await _get(_port(srv), "/healthz") == (200, b"ok\n")
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            for _r, w in conns:
                w.close()
            await srv.close()

    asyncio.run(main())


def test_at_the_cap_the_oldest_idle_client_is_closed_and_the_newest_served():
    async def main() -> None:
        srv = _server(deadline=3, max_connections=4)
        await srv.start()
        idle = [await asyncio.open_connection("127.0.0.1", _port(srv)) for _ in range(4)]
        try:
            for _ in range(50):  # until the server has taken all four
                if srv.active == 4:
                    break
                await asyncio.sleep(0.01)
            assert srv.active == 4
            assert await _get(_port(srv), "/readyz") == (200, b"ready\n")
            assert srv.evicted == 1
            metrics = (await _get(_port(srv), "/metrics"))[1]
            assert b"\npyflannel_health_clients_evicted_total 1.0\n" in metrics
            assert await _closed_within(idle[0][0], 0.5)  # the oldest made room
            for r, _w in idle[1:]:
                assert not await _closed_within(r, 0.05)
        finally:
            for _r, w in idle:
                w.close()
            await srv.close()

    asyncio.run(main())


def test_probes_are_answered_at_once_however_many_clients_trickle(caplog):
    """100 clients each send a header line every 2 s, and come back when closed (with the
    default cap of 64 and deadline of 5 s); meanwhile /healthz and /readyz are asked every
    50 ms for 5.5 s, past the deadline, and each answers 200 within 100 ms."""
    async def main() -> None:
        srv = _server()
        await srv.start()
        port = _port(srv)
        stop = asyncio.Event()

        async def trickle() -> None:
            while not stop.is_set():
                writer = None
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(b"GET /healthz HTTP/1.1\r\n")
                    i = 0
                    while not stop.is_set():
                        writer.write(f"X-Slow-{i}: 1\r\n".encode())
                        await writer.drain()
                        i += 1
                        try:  # EOF or a reset: closed by the server, so come back
                            if not await asyncio.wait_for(reader.read(1), 2):
                                break
                        except TimeoutError:
                            continue
                except ConnectionError:
                    pass
                finally:
                    if writer is not None:
                        writer.close()
                await asyncio.sleep(0.2)

        async def probe(path: str) -> tuple[float, object]:
            t0 = time.monotonic()
            try:
                got: object = await _get(port, path)
            except OSError as e:
                got = repr(e)
            return time.monotonic() - t0, got

        tricklers = [asyncio.create_task(trickle()) for _ in range(100)]
        try:
            for _ in range(100):  # until the slow clients fill the cap
                if srv.active >= 64:
                    break
                await asyncio.sleep(0.02)
            assert srv.active >= 64
            answers = []
            end = time.monotonic() + 5.5
            while time.monotonic() < end:
                answers.append(await probe("/healthz"))
                answers.append(await probe("/readyz"))
                await asyncio.sleep(0.05)
            bad = [(round(t, 3), got) for t, got in answers
                   if t > 0.1 or got not in ((200, b"ok\n"), (200, b"ready\n"))]
            assert not bad, f"{len(bad)} of {len(answers)} probes failed or were slow: {bad[:5]}"
            assert srv.active <= 64
        finally:
            stop.set()
            for t in tricklers:
                t.cancel()
            await asyncio.gather(*tricklers, return_exceptions=True)
            await srv.close()

    caplog.set_level(logging.DEBUG)
    asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]


@pytest.mark.parametrize(("request_bytes", "code"), [
    (b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * 200_000 + b"\r\n\r\n", 431),
    (b"GET /healthz HTTP/1.1\r\n" + b"X-Many: 12345678901234567890\r\n" * 2000 + b"\r\n", 431),
])
def test_oversized_requests_get_a_4xx_and_no_error_log(caplog, request_bytes, code):
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        srv = _server()
        await srv.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(srv))
            writer.write(request_bytes)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert data.startswith(f"HTTP/1.0 {code} ".encode()), data[:80]
            assert await _get(_port(srv), "/healthz") == (200, b"ok\n")
        finally:
            await srv.close()

    asyncio.run(main())
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]
    assert "Traceback" not in caplog.text and "Separator" not in caplog.text


def test_a_renamed_drop_reason_is_also_shown_under_its_old_name():
    """drop_not_ip counts what is neither IPv4 nor IPv6 (empty datagrams too); dashboards
    that read the old reason not_ipv4 keep their series."""
    state = {"backend": "udp", "counters": {"drop_not_ip": 3, "drop_truncated": 1}}
    text = Metrics(lambda: state).render().decode()
    assert 'pyflannel_dropped_packets_total{reason="not_ip"} 3.0' in text
    assert 'pyflannel_dropped_packets_total{reason="not_ipv4"} 3.0' in text
    assert 'pyflannel_dropped_packets_total{reason="truncated"} 1.0' in text
