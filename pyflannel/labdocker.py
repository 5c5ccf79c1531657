"""Real Docker daemons on lab nodes: one dockerd per node namespace, fed by mk-docker-opts.

Why: the whole point of flannel is containers on different hosts reaching each other, and
a hand-made docker0 stops one step short of that. Debian's ``docker.io`` runs fine once
per namespace, with a few things it needs that ``ip netns exec`` does not give it:

* **cgroups.** ``ip netns exec`` mounts a fresh /sys, hiding the host's cgroup mounts, and
  dockerd dies with "Devices cgroup isn't mounted". dockerd is started through a small
  shell script that first mounts again, in its own mount namespace, the hierarchies the
  host has under /sys/fs/cgroup (read from /proc/1/mounts).
* **Host paths.** dockerd and containerd write /run/docker/plugins, /run/containerd/s and
  /etc/docker/key.json whatever ``--exec-root`` says; tmpfs over /run and /etc/docker in
  that mount namespace leaves nothing on the host and keeps two nodes apart. Everything
  else (data root, exec root, pidfile, API socket) is under the node's work directory.
* **Teardown.** Containers live in network namespaces of their own, which the lab's
  sweep of its namespaces misses: containers are removed first, then dockerd stopped, then
  whatever is still in the node's ``--cgroup-parent`` is killed by PID; the cgroup
  directories go once the lab's namespaces are gone. :meth:`Lab.add_cleanup` runs this at
  every teardown, also at exit and on SIGTERM.

No registry is needed: the image is a root filesystem of Debian's ``busybox-static``
(busybox plus links for sh, ping, ip, wget, httpd, nc, ...) fed to ``docker import``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import signal
import socket
import struct
import subprocess
import tarfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyflannel import dockeropts
from pyflannel.lab import Lab, LabCommandError, LabError, LabNode

__all__ = [
    "DOCKER",
    "DOCKERD",
    "BUSYBOX",
    "IMAGE",
    "INSTALL_HINT",
    "LabDocker",
    "NodeDocker",
    "busybox_rootfs",
    "cgroup_remounts",
    "docker_missing",
    "is_static_elf",
]

# Fixed paths: Debian's client and daemon, not whatever `docker` comes first on PATH.
DOCKERD = Path("/usr/sbin/dockerd")
DOCKER = Path("/usr/bin/docker")
BUSYBOX = Path("/bin/busybox")
IMAGE = "pyflannel-busybox:lab"
INSTALL_HINT = "apt-get install docker.io busybox-static (or run scripts/setup.sh)"
CGROUP_ROOT = "/sys/fs/cgroup"
_CGROUP_TYPES = {"tmpfs", "cgroup", "cgroup2"}
# Applets linked in the image: the list plus what the tests and the demo run.
APPLETS = ("sh", "ping", "ip", "wget", "httpd", "nc", "sleep", "cat", "echo", "head",
           "sha256sum", "timeout", "mkdir", "ls", "hostname", "env")
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


def docker_missing() -> str | None:
    """Why real Docker cannot run here (with how to install it), or None if it can."""
    for path, package in ((DOCKERD, "docker.io"), (DOCKER, "docker.io"),
                          (BUSYBOX, "busybox-static")):
        if not os.access(path, os.X_OK):
            return f"needs {path} from Debian's {package}: {INSTALL_HINT}"
    if not is_static_elf(BUSYBOX):
        # A container has no libc: a dynamic busybox (Debian's "busybox") cannot start there.
        return f"{BUSYBOX} is not statically linked: {INSTALL_HINT}"
    return None


def is_static_elf(path: Path) -> bool:
    """True if ``path`` is a 64-bit little-endian ELF without a program interpreter
    (PT_INTERP), i.e. it runs without any shared library; False otherwise or unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:6] != b"\x7fELF\x02\x01":
                return False
            phoff, = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    if phentsize < 4 or len(table) < phentsize * phnum:
        return False
    types = (struct.unpack_from("<I", table, i * phentsize)[0] for i in range(phnum))
    return 3 not in types  # PT_INTERP


def cgroup_remounts(mounts: str) -> list[list[str]]:
    """``mount`` commands that put back the cgroup hierarchies listed in ``mounts``
    (/proc/1/mounts text) under a fresh /sys: the tmpfs at /sys/fs/cgroup, if any, first,
    then each hierarchy with its own options, making the mount points it needs.

    A malformed line is skipped; only mounts at or below /sys/fs/cgroup are considered.
    """
    out: list[list[str]] = []
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        source, target, fstype, options = fields[:4]
        target = target.replace("\\040", " ")
        if fstype not in _CGROUP_TYPES:
            continue
        if target != CGROUP_ROOT and not target.startswith(CGROUP_ROOT + "/"):
            continue
        if fstype == "tmpfs" and target != CGROUP_ROOT:
            continue
        if fstype == "tmpfs":  # systemd's is read-only; ours must take the mount points
            options = ",".join("rw" if o == "ro" else o for o in options.split(","))
        elif target != CGROUP_ROOT:
            out.append(["mkdir", "-p", target])
        out.append(["mount", "-t", fstype, "-o", options, source, target])
    return out


def _mount_namespace_script(remounts: Sequence[Sequence[str]], argv: Sequence[str]) -> str:
    """A shell script for ``sh -c``: cgroups back, tmpfs over /run and /etc/docker, exec."""
    lines = ["set -e"]
    lines += [shlex.join(cmd) for cmd in remounts]
    lines += ["mount -t tmpfs -o mode=755 pyflannel-run /run",
              "mkdir -p /etc/docker",
              "mount -t tmpfs -o mode=700 pyflannel-etc-docker /etc/docker",
              "exec " + shlex.join(argv)]
    return "\n".join(lines)


def busybox_rootfs(busybox: Path = BUSYBOX) -> bytes:
    """A tarball of a minimal root filesystem: /bin/busybox, a link per applet in
    :data:`APPLETS`, and the empty directories a container runtime mounts over."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for directory in ("bin", "dev", "etc", "proc", "sys", "tmp", "www", "www/cgi-bin"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(busybox), arcname="bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
    return buf.getvalue()


def _ping_socket(path: Path) -> bool:
    """True once the Docker API answers GET /_ping on the unix socket ``path``."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(str(path))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in s.recv(64).split(b"\r\n", 1)[0]
    except OSError:
        return False


class NodeDocker:
    """One dockerd in one lab node: its own data root, exec root, pidfile, API socket and
    cgroup parent, all named after the lab so two runs or two nodes never meet."""

    def __init__(self, lab: Lab, node: LabNode) -> None:
        self.lab = lab
        self.node = node
        self.dir = node.workdir / "docker"
        self.socket = self.dir / "docker.sock"
        self.log_file = node.workdir / "dockerd.log"
        self.cgroup_parent = f"pyflannel-{lab.prefix}-{node.name}"
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self, options: Sequence[str]) -> list[str]:
        """dockerd's command line; ``options`` is mk-docker-opts' output, unchanged."""
        return [
            str(DOCKERD),
            f"--data-root={self.dir / 'data'}",
            f"--exec-root={self.dir / 'exec'}",
            f"--pidfile={self.dir / 'docker.pid'}",
            f"--host=unix://{self.socket}",
            f"--cgroup-parent=/{self.cgroup_parent}",
            "--userland-proxy=false",
            "--log-level=warn",
            *options,
        ]

    def start(self, options: Sequence[str], timeout: float = _START_TIMEOUT) -> None:
        """Start dockerd with ``options`` and wait until its API answers."""
        if self.process is not None and self.process.poll() is None:
            raise LabError(f"{self.node.name}: dockerd already runs (pid {self.process.pid})")
        self.dir.mkdir(parents=True, exist_ok=True)
        script = _mount_namespace_script(
            cgroup_remounts(Path("/proc/1/mounts").read_text()), self.argv(options))
        with open(self.log_file, "ab") as logf:
            logf.write(f"=== lab: {time.ctime()}: {' '.join(self.argv(options))}\n".encode())
            logf.flush()
            # ip netns exec -> sh -> exec dockerd: the PID we hold is dockerd's own.
            self.process = self.lab.popen(self.node.ns, ["sh", "-c", script],
                                          stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not _ping_socket(self.socket):
            if self.process.poll() is not None:
                raise LabError(f"{self.node.name}: dockerd exited with {self.process.returncode}"
                               f"; tail of {self.log_file}:\n{self.tail_log()}")
            if time.monotonic() >= deadline:
                raise LabError(f"{self.node.name}: dockerd's API not up after {timeout:g}s; "
                               f"tail of {self.log_file}:\n{self.tail_log()}")
            time.sleep(0.05)

    def tail_log(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_bytes()[-64 * 1024:].decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def docker(self, *args: str, check: bool = True, timeout: float = 60,
               input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run /usr/bin/docker against this node's daemon (from the host: the API socket is
        a file in the node's work directory); output as text unless ``input`` is given."""
        argv = [str(DOCKER), "-H", f"unix://{self.socket}", *args]
        proc = subprocess.run(argv, input=input, capture_output=True, timeout=timeout,
                              text=input is None, env={**os.environ, "DOCKER_CONFIG":
                                                       str(self.dir / "client")})
        if check and proc.returncode != 0:
            raise LabCommandError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def import_busybox(self, name: str = IMAGE) -> None:
        """``docker import`` the busybox root filesystem as ``name``."""
        self.docker("import", "-", name, input=busybox_rootfs())

    def run(self, name: str, *command: str, image: str = IMAGE) -> str:
        """Start a detached container ``name`` running ``command``; its IPv4 address."""
        self.docker("run", "-d", "--name", name, image, *command)
        return self.address(name)

    def address(self, name: str) -> str:
        """The container's IPv4 address on docker0."""
        return self.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}",
                           name).stdout.strip()

    def exec(self, name: str, script: str, *, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``sh -c script`` in container ``name``."""
        return self.docker("exec", name, "sh", "-c", script, check=check, timeout=timeout)

    def stop(self) -> None:
        """Remove the containers, stop dockerd (SIGTERM, SIGKILL after 10 s), then kill by
        PID whatever is still in the cgroup parent. Never raises: it runs at teardown."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.docker("ps", "-aq", timeout=15).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, check=False, timeout=30)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        deadline = time.monotonic() + 3
        while (pids := self.cgroup_pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def cgroup_dirs(self) -> list[Path]:
        """This node's cgroup-parent directory in every hierarchy the host has mounted."""
        found = []
        for target in _host_cgroup_mounts():
            path = Path(target) / self.cgroup_parent
            if path.is_dir():
                found.append(path)
        return found

    def cgroup_pids(self) -> list[int]:
        """PIDs listed in cgroup.procs anywhere under this node's cgroup parent."""
        pids: set[int] = set()
        for top in self.cgroup_dirs():
            for procs in top.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(p) for p in procs.read_text().split())
        return sorted(pids)

    def remove_cgroups(self) -> None:
        """Remove the cgroup-parent directories, deepest first (they must be empty)."""
        for top in self.cgroup_dirs():
            for path in sorted((p for p in top.rglob("*") if p.is_dir()),
                               key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    path.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


def _host_cgroup_mounts() -> list[str]:
    """Mount points of cgroup hierarchies in this (the host's) mount namespace."""
    try:
        text = Path("/proc/self/mounts").read_text()
    except OSError:
        return []
    return [f[1] for f in (line.split() for line in text.splitlines())
            if len(f) > 2 and f[2] in ("cgroup", "cgroup2")]


class LabDocker:
    """A dockerd on each node of a lab, stopped and cleaned up with the lab itself."""

    def __init__(self, lab: Lab, nodes: Sequence[LabNode] | None = None) -> None:
        reason = docker_missing()
        if reason:
            raise LabError(reason)
        self.lab = lab
        self.daemons = {n.name: NodeDocker(lab, n) for n in (nodes or lab.nodes)}
        lab.add_cleanup(before=self.stop_all, after=self.remove_cgroups)

    def __getitem__(self, node: LabNode | str) -> NodeDocker:
        return self.daemons[node if isinstance(node, str) else node.name]

    def docker_options(self, node: LabNode) -> list[str]:
        """dockerd's options for ``node``: what ``pyflannel mk-docker-opts`` writes from the
        node's subnet file, word-split as a systemd drop-in's $DOCKER_NETWORK_OPTIONS is."""
        out = node.workdir / "docker.env"
        args = ["-f", str(node.subnet_file), "-d", str(out), "-c", "-k", "DOCKER_NETWORK_OPTIONS"]
        if dockeropts.main(args, environ={}) != 0:
            raise LabError(f"{node.name}: mk-docker-opts failed on {node.subnet_file}")
        for line in out.read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "DOCKER_NETWORK_OPTIONS":
                return " ".join(shlex.split(value)).split()
        raise LabError(f"{node.name}: mk-docker-opts wrote no DOCKER_NETWORK_OPTIONS")

    def start(self, node: LabNode) -> list[str]:
        """Start the node's dockerd with its mk-docker-opts options; those options."""
        options = self.docker_options(node)
        self[node].start(options)
        return options

    def start_all(self) -> dict[str, list[str]]:
        """:meth:`start` on every node at once (each dockerd takes about a second, most
        of it waiting); the options by node name."""
        nodes = [d.node for d in self.daemons.values()]
        with ThreadPoolExecutor(len(nodes)) as pool:
            return dict(zip((n.name for n in nodes), pool.map(self.start, nodes), strict=True))

    def stop_all(self) -> None:
        """:meth:`NodeDocker.stop` on every node at once (dockerd takes a second to stop)."""
        with ThreadPoolExecutor(len(self.daemons)) as pool:
            list(pool.map(NodeDocker.stop, self.daemons.values()))

    def remove_cgroups(self) -> None:
        for daemon in self.daemons.values():
            daemon.remove_cgroups()

