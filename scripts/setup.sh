#!/usr/bin/env bash
# Set up a fresh Debian machine (as root) to run pyflannel, its demo and its tests:
# system packages from apt, then a virtualenv in .venv with the project and its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs packages and the lab needs network namespaces)" >&2
  exit 1
fi

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v ip >/dev/null || need+=(iproute2)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v iptables >/dev/null || need+=(iptables)
command -v nft >/dev/null || need+=(nftables)
command -v ping >/dev/null || need+=(iputils-ping)
command -v tcpdump >/dev/null || need+=(tcpdump)  # tests read hand-built gre/ipip packets with it
{ command -v ovs-vswitchd && command -v ovsdb-server; } >/dev/null || need+=(openvswitch-switch)  # gre interop test (userspace datapath)
{ command -v wireguard-go && command -v wg; } >/dev/null || need+=(wireguard-go wireguard-tools)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)  # bridge, host-local, portmap behind pyflannel-cni
{ [ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ]; } || need+=(docker.io)  # a dockerd per lab node
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)  # the lab containers' image
{ command -v bird && command -v birdc; } >/dev/null || need+=(bird2)
{ command -v gobgpd && command -v gobgp; } >/dev/null || need+=(gobgpd)
command -v sysctl >/dev/null || need+=(procps)
command -v systemd-analyze >/dev/null || need+=(systemd)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup.sh: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
  if [[ " ${need[*]} " == *" docker.io "* ]] && [ -d /run/systemd/system ]; then
    # The lab runs its own dockerd per node; the host's would only get in the way.
    systemctl stop docker.service docker.socket containerd.service 2>/dev/null || true
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e '.[test,bench]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import pyflannel, aetcd, pyroute2, pytun, uvloop, prometheus_client'
echo "setup.sh: ready (.venv)"
