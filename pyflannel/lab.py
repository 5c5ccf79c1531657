"""A throw-away multi-node cluster on one machine, for tests, the demo and benchmarks.

Why: flanneld only makes sense with several hosts sharing an underlay and an etcd.
Network namespaces give us that on one box, cheaply and without touching the host.

Layout (``P`` is a per-run prefix such as ``pf3a9c1e``)::

    P-br    bridge "br0" (fd00:198::ffff/64); one port "v-<name>" per attached namespace
    P-n1    eth0 198.18.0.1/24 and fd00:198::1/64, IPv4 and IPv6 forwarding on,
            IPv6 default route via fd00:198::ffff      (node n1; n2 = .2 and ::2, ...)
    P-etcd  eth0 198.18.0.100/24 and fd00:198::100/64, runs etcd on :2379
    P-<h>   extra hosts from add_host(), e.g. an "internet" box at 198.18.0.200

The underlay is dual-stack: every attached namespace also has an address in the ULA
fd00:198::/64, written with the same digits as its IPv4 address's last byte (198.18.0.12 is
fd00:198::12), and an IPv6 default route, because flanneld finds the IPv6 side of its
external interface through the IPv6 default route. IPv6 addresses are added without
duplicate address detection so they are usable at once.

Good-citizen rules this module keeps:

* the root network namespace gets no links, addresses or routes (veth pairs are
  created directly inside the lab's namespaces);
* only namespaces this Lab created are ever deleted, only processes it started (or
  that live inside its own namespaces) are ever signalled, always by PID;
* teardown is idempotent, never raises, and runs on ``with`` exit, on failures during
  start, at interpreter exit (atexit) and on SIGTERM/SIGHUP of the owning process.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

__all__ = [
    "DaemonExitedError",
    "Lab",
    "LabCommandError",
    "LabError",
    "LabNode",
    "UNDERLAY_NET",
    "UNDERLAY_NET6",
    "require_root_and_tools",
]

log = logging.getLogger(__name__)

UNDERLAY_NET = ipaddress.IPv4Network("198.18.0.0/24")
ETCD_IP = "198.18.0.100"
UNDERLAY_NET6 = ipaddress.IPv6Network("fd00:198::/64")
BRIDGE_IP6 = "fd00:198::ffff"  # the bridge namespace: every node's IPv6 default router
BRIDGE = "br0"
NETNS_DIR = Path("/run/netns")
KEEP_ENV = "PYFLANNEL_LAB_KEEP"
_REPO_ROOT = Path(__file__).resolve().parent.parent
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_MAX_IFNAME = 15  # IFNAMSIZ - 1


class LabError(RuntimeError):
    """The lab could not be built or an operation on it failed."""


class DaemonExitedError(LabError):
    """A daemon we were waiting on exited before producing what we waited for."""


class LabCommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message carries the command's output (tests need it)."""

    def __str__(self) -> str:
        parts = [super().__str__()]
        for label, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
                parts.append(f"{label}: {text.strip()[-2000:]}")
        return "\n".join(parts)


@dataclass
class LabNode:
    """One flannel host: a namespace with eth0 on the underlay and a work directory."""

    name: str
    ns: str
    underlay_ip: str
    workdir: Path
    subnet_file: Path
    log_file: Path
    underlay_ip6: str = ""  # fd00:198::<n>
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)


def underlay_ip6(ip: str) -> str:
    """The lab's IPv6 underlay address of the host at IPv4 ``ip``: 198.18.0.12 -> fd00:198::12."""
    last = ipaddress.IPv4Address(ip).packed[-1]
    return str(ipaddress.IPv6Address(f"{UNDERLAY_NET6.network_address}{last}"))


def require_root_and_tools() -> str | None:
    """Say why the lab cannot run here (for pytest skip reasons), or None if it can."""
    if os.geteuid() != 0:
        return "lab needs root (network namespaces)"
    if not Path("/dev/net/tun").exists():
        return "lab needs /dev/net/tun"
    for tool in ("ip", "etcd", "etcdctl", "ping", "sysctl"):
        if shutil.which(tool) is None:
            return f"lab needs the {tool!r} binary on PATH"
    return None


# --------------------------------------------------------------------------------------
# process-wide safety net: every live Lab is torn down at exit and on SIGTERM/SIGHUP
# --------------------------------------------------------------------------------------

_live_labs: list[Lab] = []
_registry_lock = threading.Lock()
_atexit_registered = False
_prev_handlers: dict[int, Any] = {}


def _register(lab: Lab) -> None:
    global _atexit_registered
    with _registry_lock:
        if lab not in _live_labs:
            _live_labs.append(lab)
        if not _atexit_registered:
            atexit.register(_teardown_all)
            _atexit_registered = True
    _install_signal_handlers()


def _unregister(lab: Lab) -> None:
    with _registry_lock:
        if lab in _live_labs:
            _live_labs.remove(lab)


def _teardown_all() -> None:
    with _registry_lock:
        labs = [lab for lab in _live_labs if lab._owner_pid == os.getpid()]
    for lab in reversed(labs):
        lab.teardown()


def _install_signal_handlers() -> None:
    """Clean up on SIGTERM/SIGHUP, which would otherwise kill us without running atexit.

    Only replaces the default disposition (never someone else's handler), and only from
    the main thread, where Python allows it.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if sig in _prev_handlers:
            continue
        try:
            current = signal.getsignal(sig)
            if current is not signal.SIG_DFL:
                continue
            signal.signal(sig, _on_fatal_signal)
            _prev_handlers[sig] = current
        except (ValueError, OSError):  # pragma: no cover - exotic embedding
            pass


def _on_fatal_signal(signum: int, frame: FrameType | None) -> None:
    _teardown_all()
    # Die the way the signal would have made us die, so callers see the right status.
    signal.signal(signum, _prev_handlers.get(signum, signal.SIG_DFL))
    os.kill(os.getpid(), signum)


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def _merged_env(extra: Mapping[str, str | None] | None) -> dict:
    """os.environ plus ``extra`` (a None value removes a variable)."""
    env = dict(os.environ)
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    """Signal the process group led by ``proc`` (started with start_new_session=True).

    Only while ``proc`` is unreaped: its PID (= PGID) cannot have been recycled then.
    """
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:  # pragma: no cover - not our group after all
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, sig)


def _wait_quietly(proc: subprocess.Popen[Any], timeout: float) -> bool:
    try:
        proc.wait(timeout=max(timeout, 0))
        return True
    except subprocess.TimeoutExpired:
        return False


def _tail(path: Path, lines: int) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    text = data[-256 * 1024 :].decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _ns_inode(ns: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_DIR / ns)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _pids_in_netns(inodes: set[tuple[int, int]]) -> list[int]:
    """PIDs whose network namespace is one of ``inodes`` (read from /proc, no tools)."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in inodes:
            found.append(int(entry))
    return found


def _parse_env_file(text: str) -> dict[str, str] | None:
    """KEY=VALUE lines -> dict; None if the text is empty or malformed."""
    result: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            return None
        result[key] = value
    return result or None


# --------------------------------------------------------------------------------------
# the lab
# --------------------------------------------------------------------------------------


class Lab:
    """A bridge, N flannel nodes and an etcd, each in its own network namespace.

    Use as a context manager; everything is removed on exit, whatever happens.
    """

    def __init__(
        self,
        nodes: int = 3,
        *,
        prefix: str | None = None,
        workdir: Path | None = None,
        with_etcd: bool = True,
        mtu: int = 1500,
    ) -> None:
        if not 1 <= nodes <= 99:
            raise ValueError("nodes must be between 1 and 99 (198.18.0.1-99)")
        if not 576 <= mtu <= 65535:
            raise ValueError(f"unreasonable mtu {mtu}")
        self.prefix = prefix or f"pf{secrets.token_hex(3)}"
        if not _NAME_RE.match(self.prefix) or len(self.prefix) > 12:
            raise ValueError(f"bad prefix {self.prefix!r}: [A-Za-z0-9_-], at most 12 chars")
        self.mtu = mtu
        self.with_etcd = with_etcd

        self._own_workdir = False
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="pyflannel-lab-"))
            self._own_workdir = True
        else:
            self.workdir = Path(workdir).resolve()
            if not self.workdir.exists():
                self.workdir.mkdir(parents=True)
                self._own_workdir = True

        self.bridge_ns = f"{self.prefix}-br"
        self.etcd_ns = f"{self.prefix}-etcd"
        self.etcd_endpoint = f"http://{ETCD_IP}:2379"
        self.etcd_data_dir = self.workdir / "etcd"
        self.etcd_log = self.workdir / "etcd.log"
        self.nodes: list[LabNode] = []
        for i in range(1, nodes + 1):
            ndir = self.workdir / f"n{i}"
            self.nodes.append(
                LabNode(
                    name=f"n{i}",
                    ns=f"{self.prefix}-n{i}",
                    underlay_ip=str(UNDERLAY_NET.network_address + i),
                    workdir=ndir,
                    subnet_file=ndir / "subnet.env",
                    log_file=ndir / "daemon.log",
                    underlay_ip6=underlay_ip6(str(UNDERLAY_NET.network_address + i)),
                )
            )
        self.hosts: dict[str, str] = {}  # add_host name -> namespace

        self._namespaces: list[str] = []  # only those WE created, in creation order
        self._used_ips: set[str] = set()
        self._procs: list[subprocess.Popen[Any]] = []
        self._etcd: subprocess.Popen[bytes] | None = None
        self._started = False
        self._torn_down = False
        self._lock = threading.RLock()
        # Forked children (pyroute2's NetNS helper, multiprocessing, ...) inherit our
        # atexit hook and this object; only the creating process may tear down.
        self._owner_pid = os.getpid()
        # (before, after) pairs from add_cleanup, run at teardown around the lab's own steps
        self._cleanups: list[tuple[Callable[[], None] | None, Callable[[], None] | None]] = []
        _register(self)  # the temp workdir already exists: make sure it goes away

    # ---------------------------------------------------------------- context manager

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def __repr__(self) -> str:
        return f"<Lab {self.prefix} nodes={len(self.nodes)} workdir={self.workdir}>"

    def add_cleanup(self, before: Callable[[], None] | None = None,
                    after: Callable[[], None] | None = None) -> None:
        """Run ``before`` at teardown ahead of everything else (while the daemons and the
        namespaces still exist) and ``after`` once the namespaces are gone; newest first.

        Why: things the lab does not own but hosts (a dockerd and its containers) must go
        in their own order, at every teardown, also at exit and on SIGTERM.
        """
        self._cleanups.append((before, after))

    def node(self, name: str) -> LabNode:
        """Look a node up by name ("n1")."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    # ---------------------------------------------------------------- build

    def start(self) -> None:
        """Build namespaces, bridge and links, start etcd and wait until it is healthy.

        On any failure (including Ctrl-C) whatever was built is torn down again.
        """
        with self._lock:
            if self._torn_down:
                raise LabError("this Lab was torn down; make a new one")
            if self._started:
                return
            self._started = True
        try:
            self._build()
            if self.with_etcd:
                self.start_etcd()
        except BaseException:
            self.teardown()
            raise

    def _build(self) -> None:
        self._add_ns(self.bridge_ns)
        self._ip(self.bridge_ns, "link", "set", "lo", "up")
        self._ip(self.bridge_ns, "link", "add", BRIDGE, "type", "bridge")
        self._ip(self.bridge_ns, "link", "set", BRIDGE, "up")
        self._ip(self.bridge_ns, "addr", "add", f"{BRIDGE_IP6}/{UNDERLAY_NET6.prefixlen}",
                 "dev", BRIDGE, "nodad")
        for node in self.nodes:
            node.workdir.mkdir(parents=True, exist_ok=True)
            self._attach(node.name, node.ns, node.underlay_ip)
            self._sysctl(node.ns, "net.ipv4.ip_forward", "1")
            self._sysctl(node.ns, "net.ipv6.conf.all.forwarding", "1")
        if self.with_etcd:
            self._attach("etcd", self.etcd_ns, ETCD_IP)

    def _add_ns(self, ns: str) -> None:
        if (NETNS_DIR / ns).exists():
            raise LabError(f"namespace {ns} already exists; refusing to touch it")
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        self._namespaces.append(ns)

    def _attach(self, name: str, ns: str, ip: str) -> None:
        """New namespace ``ns`` whose eth0 (``ip``/24 and its fd00:198::/64 twin, IPv6
        default route via the bridge) is plugged into the lab bridge.

        The veth pair is created inside the bridge namespace with its peer placed
        straight into ``ns``, so it never appears in the root namespace.
        """
        port = f"v-{name}"
        if len(port) > _MAX_IFNAME:
            raise ValueError(f"name {name!r} too long for interface {port!r}")
        self._add_ns(ns)
        mtu = str(self.mtu)
        self._ip(
            self.bridge_ns,
            "link", "add", port, "mtu", mtu, "type", "veth",
            "peer", "name", "eth0", "mtu", mtu, "netns", ns,
        )  # fmt: skip
        self._ip(self.bridge_ns, "link", "set", port, "master", BRIDGE, "up")
        self._ip(ns, "link", "set", "lo", "up")
        self._ip(ns, "addr", "add", f"{ip}/{UNDERLAY_NET.prefixlen}", "dev", "eth0")
        self._ip(ns, "addr", "add", f"{underlay_ip6(ip)}/{UNDERLAY_NET6.prefixlen}",
                 "dev", "eth0", "nodad")
        self._ip(ns, "link", "set", "eth0", "up")
        self._ip(ns, "-6", "route", "add", "default", "via", BRIDGE_IP6, "dev", "eth0")
        self._used_ips.add(ip)

    def _ip(self, ns: str, *args: str) -> None:
        self._check_ns(ns)
        proc = subprocess.run(["ip", "-n", ns, *args], capture_output=True, timeout=30)
        if proc.returncode != 0:
            raise LabCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)

    def _sysctl(self, ns: str, key: str, value: str) -> None:
        self.run(ns, ["sysctl", "-q", "-w", f"{key}={value}"])

    def _check_ns(self, ns: str) -> None:
        if ns not in self._namespaces:
            raise LabError(f"{ns!r} is not a namespace of this lab ({self.prefix})")

    def add_host(self, name: str, ip: str) -> str:
        """Attach an extra namespace (e.g. an "internet" host) to the underlay bridge.

        ``ip`` must be inside 198.18.0.0/24 and unused (convention: .200 and up).
        Returns the namespace name, f"{prefix}-{name}".
        """
        if not self._namespaces or self._torn_down:
            raise LabError("lab is not running")
        if not _NAME_RE.match(name) or name in {"br", "etcd"} or name in self.hosts:
            raise ValueError(f"bad or duplicate host name {name!r}")
        if any(n.name == name for n in self.nodes):
            raise ValueError(f"host name {name!r} clashes with a node")
        addr = ipaddress.IPv4Interface(ip if "/" in ip else f"{ip}/{UNDERLAY_NET.prefixlen}")
        if addr.ip not in UNDERLAY_NET or addr.network != UNDERLAY_NET:
            raise ValueError(f"{ip} is not an address in {UNDERLAY_NET}")
        if str(addr.ip) in self._used_ips:
            raise ValueError(f"{addr.ip} is already used in this lab")
        ns = f"{self.prefix}-{name}"
        with self._lock:
            self._attach(name, ns, str(addr.ip))
            self.hosts[name] = ns
        return ns

    # ---------------------------------------------------------------- commands

    def run(
        self,
        ns: str,
        argv: list[str],
        *,
        check: bool = True,
        timeout: float = 30,
        env: dict | None = None,
        input: bytes | None = None,
        text: bool = False,
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` inside lab namespace ``ns`` and capture its output (bytes by default).

        ``env`` is merged over os.environ (a None value unsets). On timeout the whole
        process group is killed and subprocess.TimeoutExpired raised.
        """
        self._check_ns(ns)
        cmd = ["ip", "netns", "exec", ns, *argv]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_merged_env(env),
            start_new_session=True,
            text=text,
        )
        data: Any = input.decode() if (text and input is not None) else input
        try:
            out, err = proc.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                exc.output, exc.stderr = proc.communicate(timeout=5)
            raise
        except BaseException:
            _signal_group(proc, signal.SIGKILL)
            _wait_quietly(proc, 5)
            raise
        if check and proc.returncode != 0:
            raise LabCommandError(proc.returncode, cmd, out, err)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def popen(
        self,
        ns: str,
        argv: list[str],
        *,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.DEVNULL,
        env: dict | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        cwd: Path | str | None = None,
    ) -> subprocess.Popen:
        """Start a background process in ``ns``; it (and its process group) dies at teardown.

        ``env`` is merged over os.environ (a None value unsets).
        """
        with self._lock:
            if self._torn_down:
                raise LabError("lab is torn down")
            self._check_ns(ns)
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                env=_merged_env(env),
                cwd=cwd,
                start_new_session=True,
            )
            self._procs.append(proc)
            return proc

    def ping(
        self,
        src: LabNode | str,
        dst_ip: str,
        *,
        src_ip: str | None = None,
        count: int = 1,
        timeout: float = 2,
    ) -> bool:
        """True if ``dst_ip`` answers ``count`` pings from ``src`` (a node or a lab ns)."""
        ns = src.ns if isinstance(src, LabNode) else src
        argv = ["ping", "-n", "-q", "-c", str(count), "-W", f"{timeout:g}"]
        if count > 1:
            argv += ["-i", "0.2"]
        if src_ip:
            argv += ["-I", src_ip]
        argv.append(dst_ip)
        try:
            proc = self.run(ns, argv, check=False, timeout=count * (timeout + 0.5) + 5)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    # ---------------------------------------------------------------- etcd

    def etcdctl(self, *args: str, check: bool = True) -> str:
        """ETCDCTL_API=3 etcdctl against the lab etcd, run from the etcd namespace; stdout."""
        if not self.with_etcd:
            raise LabError("this lab has no etcd (with_etcd=False)")
        proc = self.run(
            self.etcd_ns,
            ["etcdctl", f"--endpoints={self.etcd_endpoint}", *args],
            check=check,
            env=self._etcdctl_env(),
            text=True,
        )
        return proc.stdout

    @staticmethod
    def _etcdctl_env() -> dict:
        env = {k: None for k in os.environ if k.startswith("ETCDCTL_")}
        env["ETCDCTL_API"] = "3"
        return env

    def start_etcd(self) -> None:
        """(Re)start etcd on the same data dir and wait (20 s) until it reports healthy."""
        if not self.with_etcd:
            raise LabError("this lab has no etcd (with_etcd=False)")
        with self._lock:
            if self._torn_down:
                raise LabError("lab is torn down")
            if self._etcd is not None and self._etcd.poll() is None:
                return
            url = self.etcd_endpoint
            peer = "http://127.0.0.1:2380"
            argv = [
                "etcd",
                "--name", "lab",
                "--data-dir", str(self.etcd_data_dir),
                "--listen-client-urls", url,
                "--advertise-client-urls", url,
                "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"lab={peer}",
                "--logger", "zap",
                "--log-level", "warn",
            ]  # fmt: skip
            with open(self.etcd_log, "ab") as logf:
                logf.write(f"=== lab: starting etcd at {time.ctime()}\n".encode())
                logf.flush()
                self._etcd = self.popen(
                    self.etcd_ns,
                    argv,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env={k: None for k in os.environ if k.startswith("ETCD")},
                    cwd=self.workdir,
                )
        self._wait_etcd_healthy(20)

    def _wait_etcd_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            etcd = self._etcd
            # Waiting on the process (not sleeping) notices a crashing etcd at once.
            if etcd is None or _wait_quietly(etcd, 0.2):
                code = None if etcd is None else etcd.returncode
                raise LabError(
                    f"etcd exited (code {code}) before becoming healthy; "
                    f"tail of {self.etcd_log}:\n{_tail(self.etcd_log, 30)}"
                )
            try:
                proc = self.run(
                    self.etcd_ns,
                    [
                        "etcdctl", f"--endpoints={self.etcd_endpoint}",
                        "--dial-timeout=1s", "--command-timeout=2s", "endpoint", "health",
                    ],
                    check=False,
                    timeout=5,
                    env=self._etcdctl_env(),
                    text=True,
                )  # fmt: skip
                if proc.returncode == 0:
                    return
                last = (proc.stderr or proc.stdout).strip()
            except subprocess.TimeoutExpired:
                last = "etcdctl endpoint health timed out"
            if time.monotonic() >= deadline:
                raise LabError(
                    f"etcd not healthy after {timeout:g}s ({last}); "
                    f"tail of {self.etcd_log}:\n{_tail(self.etcd_log, 30)}"
                )

    def stop_etcd(self, *, wipe: bool = False) -> None:
        """Stop our etcd (SIGTERM, SIGKILL after 5 s); ``wipe`` also deletes its data dir."""
        with self._lock:
            etcd, self._etcd = self._etcd, None
        if etcd is not None:
            self._stop_proc(etcd, signal.SIGTERM, 5)
        if wipe:
            shutil.rmtree(self.etcd_data_dir, ignore_errors=True)

    # ---------------------------------------------------------------- daemons

    def daemon_argv(self, node: LabNode, *extra: str) -> list[str]:
        """The pyflannel command line for ``node`` (lab etcd, its subnet file, eth0)."""
        return [
            sys.executable,
            "-m",
            "pyflannel",
            "run",
            f"-etcd-endpoints={self.etcd_endpoint}",
            f"-subnet-file={node.subnet_file}",
            "-iface=eth0",
            *extra,
        ]

    def start_daemon(self, node: LabNode, *extra: str, env: dict | None = None) -> subprocess.Popen:
        """Start pyflannel in ``node.ns``; output is appended to ``node.log_file``.

        This source tree's pyflannel is put first on PYTHONPATH so the code under test
        runs even if another copy is installed. ``env`` is merged over os.environ. Each
        node keeps its WireGuard key in its own work directory, as each host has its own
        /run (the default /run/flannel/wgkey would be one key for every namespace).
        """
        if node.process is not None and node.process.poll() is None:
            raise LabError(f"{node.name}: a daemon is already running (pid {node.process.pid})")
        pypath = os.pathsep.join(
            p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        full_env: dict[str, str | None] = {
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": pypath,
            "WIREGUARD_KEY_FILE": str(node.workdir / "wgkey")}
        full_env.update(env or {})
        argv = self.daemon_argv(node, *extra)
        node.workdir.mkdir(parents=True, exist_ok=True)
        with open(node.log_file, "ab") as logf:
            logf.write(f"=== lab: {time.ctime()}: {' '.join(argv)}\n".encode())
            logf.flush()
            node.process = self.popen(
                node.ns,
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=node.workdir,
            )
        return node.process

    def stop_daemon(
        self, node: LabNode, sig: int = signal.SIGTERM, timeout: float = 5
    ) -> int | None:
        """Send ``sig`` to the node's daemon, SIGKILL it after ``timeout``; its exit code.

        None if no daemon was started. Negative codes mean "killed by signal" (Popen).
        """
        proc = node.process
        if proc is None:
            return None
        node.process = None
        return self._stop_proc(proc, sig, timeout)

    def _stop_proc(self, proc: subprocess.Popen[Any], sig: int, timeout: float) -> int | None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)  # the process itself, so signal semantics are exact
            if not _wait_quietly(proc, timeout):
                _signal_group(proc, signal.SIGKILL)
                _wait_quietly(proc, 5)
        # Its orphaned children, if any, stay until teardown's namespace sweep.
        with self._lock:
            if proc in self._procs:
                self._procs.remove(proc)
        return proc.returncode

    def wait_subnet_file(self, node: LabNode, timeout: float = 20) -> dict[str, str]:
        """Wait until the daemon wrote a complete KEY=VALUE subnet file; return it parsed.

        Raises TimeoutError (with the log tail) or DaemonExitedError if the daemon died
        without writing it.
        """
        deadline = time.monotonic() + timeout
        previous: str | None = None
        while True:
            try:
                text: str | None = node.subnet_file.read_text()
            except (OSError, UnicodeDecodeError):
                text = None
            parsed = _parse_env_file(text) if text else None
            # A final newline marks a complete write; without one, accept the content
            # once it stayed the same for one poll (guards against half-written files).
            if parsed is not None and (text.endswith("\n") or text == previous):
                return parsed
            previous = text
            proc = node.process
            if proc is not None and proc.poll() is not None:
                raise DaemonExitedError(
                    f"{node.name}: daemon exited with {proc.returncode} before writing "
                    f"{node.subnet_file}; log tail:\n{self.tail_log(node)}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{node.name}: no valid {node.subnet_file} after {timeout:g}s; "
                    f"log tail:\n{self.tail_log(node)}"
                )
            time.sleep(0.1)

    def tail_log(self, node: LabNode, lines: int = 40) -> str:
        """Last ``lines`` lines of the node's daemon log ('' if none yet)."""
        return _tail(node.log_file, lines)

    def add_docker0(
        self, node: LabNode, flannel_subnet: str | None, ipv6_subnet: str | None = None
    ) -> None:
        """Give ``node`` a docker0 bridge holding ``flannel_subnet`` (e.g. "10.1.15.1/24")
        and, for IPv6 networks, ``ipv6_subnet`` (FLANNEL_IPV6_SUBNET, "fc00:10:1:5c::1/64").

        Mimics what Docker does with flannel's subnet.env; a second call replaces the
        addresses, as a Docker restart with a new lease would. ``flannel_subnet`` None (an
        IPv6-only node) leaves docker0 without IPv4.
        """
        ifaces: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
        for value, example, cls in (
            (flannel_subnet, "10.1.15.1/24", ipaddress.IPv4Interface),
            (ipv6_subnet, "fc00:10:1:5c::1/64", ipaddress.IPv6Interface),
        ):
            if value is None:
                continue
            if "/" not in value:
                raise ValueError(f"{value!r} needs a prefix length, e.g. {example}")
            ifaces.append(cls(value))
        if not ifaces:
            raise ValueError("add_docker0 needs an IPv4 or an IPv6 subnet")
        if not self._docker0_exists(node):
            self._ip(node.ns, "link", "add", "docker0", "type", "bridge")
        self._ip(node.ns, "-4", "addr", "flush", "dev", "docker0")
        self._ip(node.ns, "-6", "addr", "flush", "dev", "docker0", "scope", "global")
        for iface in ifaces:
            extra = ["nodad"] if iface.version == 6 else []
            self._ip(node.ns, "addr", "add", str(iface), "dev", "docker0", *extra)
        self._ip(node.ns, "link", "set", "docker0", "up")

    def _docker0_exists(self, node: LabNode) -> bool:
        from pyroute2 import NetNS  # imported lazily: tools that only plan labs need not

        # flags=0: never (re)create the namespace, which NetNS would do by default.
        with NetNS(node.ns, flags=0) as nl:
            return bool(nl.link_lookup(ifname="docker0"))

    # ---------------------------------------------------------------- teardown

    def teardown(self) -> None:
        """Kill our processes, delete our namespaces and temp dir. Idempotent, never raises.

        Ctrl-C/SIGTERM are held back while it runs (main thread) so a second interrupt
        cannot leave half a lab behind; they are delivered right after.
        """
        if os.getpid() != self._owner_pid:
            return
        blocked = False
        if threading.current_thread() is threading.main_thread():
            try:
                signal.pthread_sigmask(
                    signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
                )
                blocked = True
            except (OSError, ValueError):  # pragma: no cover
                pass
        try:
            with self._lock:
                if self._torn_down:
                    return
                self._torn_down = True
                self._teardown_steps()
        except BaseException as exc:  # teardown must never raise
            log.warning("lab %s: teardown problem: %r", self.prefix, exc)
        finally:
            _unregister(self)
            if blocked:
                # Unblocks; a pending Ctrl-C is raised here, after the cleanup.
                signal.pthread_sigmask(
                    signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
                )

    def _teardown_steps(self) -> None:
        for before, _after in reversed(self._cleanups):
            if before is not None:
                self._guard(before)
        # 1. polite SIGTERM to every process group we started, then SIGKILL; daemons
        #    first and etcd last, so daemons can still reach etcd while shutting down
        daemons = [n.process for n in self.nodes if n.process is not None]
        etcd = [self._etcd] if self._etcd is not None else []
        others = [p for p in self._procs if p not in daemons and p not in etcd]
        for group in (daemons, others, etcd):
            self._terminate(group)
        self._procs.clear()
        self._etcd = None
        # 2. anything else still living in our namespaces (e.g. a daemon's orphaned
        #    children): find by netns inode in /proc, kill by PID
        inodes = {i for i in map(_ns_inode, self._namespaces) if i is not None}
        if inodes:
            deadline = time.monotonic() + 3
            while True:
                pids = _pids_in_netns(inodes)
                if not pids or time.monotonic() >= deadline:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)
            if pids:
                log.warning("lab %s: processes still in lab namespaces: %s", self.prefix, pids)
        # 3. namespaces, newest first; the veths inside die with them
        for ns in reversed(self._namespaces):
            proc = self._guard(
                subprocess.run, ["ip", "netns", "del", ns], capture_output=True, timeout=30
            )
            if proc is not None and proc.returncode != 0 and (NETNS_DIR / ns).exists():
                err = proc.stderr.decode(errors="replace").strip()
                log.warning("lab %s: could not delete netns %s: %s", self.prefix, ns, err)
        self._namespaces.clear()
        for _before, after in reversed(self._cleanups):
            if after is not None:
                self._guard(after)
        # 4. files
        if self._own_workdir:
            if os.environ.get(KEEP_ENV) == "1":
                print(f"pyflannel lab {self.prefix}: kept {self.workdir}", file=sys.stderr)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _terminate(self, procs: list[subprocess.Popen[Any]]) -> None:
        for proc in procs:
            self._guard(_signal_group, proc, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for proc in procs:
            if not _wait_quietly(proc, deadline - time.monotonic()):
                self._guard(_signal_group, proc, signal.SIGKILL)
                _wait_quietly(proc, 2)

    def _guard(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # teardown keeps going whatever fails
            log.warning("lab %s: teardown step %s failed: %r", self.prefix, fn, exc)
            return None
