"""The WireGuard rows of the benchmark: pyflannel's wireguard backend, and Debian's
wireguard-go between the same two namespaces, set up as flanneld sets up its kernel
device (the peer to beat: the kernel has no WireGuard here, so wireguard-go is what an
operator would otherwise run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from pyflannel.lab import Lab, LabNode
from pyflannel.wireguard.keys import PrivateKey

PORT = 51820
SOCK_DIR = Path("/var/run/wireguard")
_REPO = Path(__file__).resolve().parent.parent


def daemon_env(node: LabNode) -> dict[str, str]:
    """Each node its own key file (the default /run/flannel/wgkey is shared by every
    namespace of one machine)."""
    return {"WIREGUARD_KEY_FILE": str(node.workdir / "wgkey")}


def cleanup() -> None:
    """Nothing is left outside the lab (kept for the callers)."""


class WireguardGo:
    """wireguard-go on two lab nodes: listen port 51820, the subnet's network address as
    /32, the whole network routed through the device, MTU - 80, one peer each with
    AllowedIPs = the other's subnet and Endpoint = its address:51820."""

    SUBNETS = ("10.1.250", "10.1.251")

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.procs: list[subprocess.Popen] = []
        self.devs: list[str] = []
        self.keys = [PrivateKey.generate(), PrivateKey.generate()]

    @staticmethod
    def available() -> bool:
        return shutil.which("wireguard-go") is not None and shutil.which("wg") is not None

    def start(self) -> tuple[LabNode, LabNode, str, str]:
        lab = self.lab
        a, b = lab.nodes[:2]
        for i, node in enumerate((a, b)):
            dev = f"{lab.prefix[:8]}g{i}"  # the control socket directory is shared
            self.devs.append(dev)
            node.workdir.mkdir(parents=True, exist_ok=True)
            log = open(node.workdir / "wireguard-go.log", "ab")  # noqa: SIM115 - child's
            env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
            self.procs.append(lab.popen(node.ns, ["wireguard-go", "-f", dev], stdout=log,
                                        stderr=subprocess.STDOUT, env=env))
            log.close()
        deadline = time.monotonic() + 10
        while not all((SOCK_DIR / f"{d}.sock").exists() for d in self.devs):
            if time.monotonic() > deadline:
                raise RuntimeError("wireguard-go did not start")
            time.sleep(0.05)
        for i, node in enumerate((a, b)):
            other = 1 - i
            keyfile = node.workdir / "wggo.key"
            fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, self.keys[i].to_base64().encode() + b"\n")
            os.close(fd)
            peer_ip = (b if i == 0 else a).underlay_ip
            lab.run(node.ns, ["wg", "set", self.devs[i], "listen-port", str(PORT),
                              "private-key", str(keyfile), "peer",
                              self.keys[other].public_base64, "allowed-ips",
                              f"{self.SUBNETS[other]}.0/24", "endpoint", f"{peer_ip}:{PORT}"])
            ip = ["ip", "-n", node.ns]
            subprocess.run([*ip, "addr", "add", f"{self.SUBNETS[i]}.0/32", "dev", self.devs[i]],
                           check=True)
            subprocess.run([*ip, "link", "set", self.devs[i], "mtu", "1420", "up"], check=True)
            subprocess.run([*ip, "route", "replace", "10.1.0.0/16", "dev", self.devs[i]],
                           check=True)
            lab.add_docker0(node, f"{self.SUBNETS[i]}.1/24")
        return a, b, f"{self.SUBNETS[0]}.1", f"{self.SUBNETS[1]}.1"

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for dev in self.devs:
            (SOCK_DIR / f"{dev}.sock").unlink(missing_ok=True)
        self.procs, self.devs = [], []
