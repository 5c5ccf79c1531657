"""The CNI commands (ADD, DEL, CHECK, VERSION) and the ``pyflannel-cni`` entry point.

A runtime runs the plugin with ``CNI_COMMAND`` and the other ``CNI_*`` variables in the
environment and the network config on stdin. Results go to stdout; so does an error, as
CNI error JSON with a non-zero exit status. Diagnostics go to stderr.

GC and STATUS belong to CNI 1.1.0, which this plugin does not claim: the delegates it
drives (containernetworking-plugins 1.1.1 on Debian) speak at most 1.0.0, so a 1.1.0
config could not be handed over. A runtime never sends them for the versions offered.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from pyflannel.cni.errors import (
    INCOMPATIBLE_VERSION,
    INTERNAL,
    INVALID_ENVIRONMENT,
    INVALID_NETWORK_CONFIG,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    CniError,
)
from pyflannel.cni.invoke import run_delegate
from pyflannel.cni.netconf import (
    SUPPORTED_VERSIONS,
    FlannelEnv,
    PluginConf,
    build_delegate,
    parse_flannel_env,
    parse_plugin_conf,
)
from pyflannel.cni.store import DelegateStore, check_container_id
from pyflannel.host.subnetfile import read_env_file

_NEEDS = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
}
_NO_CHECK = {"0.3.0", "0.3.1"}  # CHECK arrived with CNI 0.4.0


@dataclass(frozen=True)
class Invocation:
    """One call from the runtime: the command, its environment and the config bytes."""

    command: str
    environ: Mapping[str, str]
    stdin: bytes

    @property
    def container_id(self) -> str:
        return self.environ["CNI_CONTAINERID"]

    def check_environment(self) -> None:
        missing = [k for k in _NEEDS[self.command] if not self.environ.get(k)]
        if missing:
            raise CniError(INVALID_ENVIRONMENT,
                           f"{self.command} needs {', '.join(missing)} in the environment")
        check_container_id(self.container_id)


def load_flannel_env(path: str) -> FlannelEnv:
    """subnet.env as the daemon wrote it; TRY_AGAIN_LATER while there is none."""
    try:
        values = read_env_file(path)
    except FileNotFoundError:
        raise CniError(TRY_AGAIN_LATER,
                       f"{path} does not exist: is pyflanneld running?") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CniError(TRY_AGAIN_LATER, f"cannot read {path}: {e}") from None
    return parse_flannel_env(values, where=path)


def cmd_add(call: Invocation, conf: PluginConf) -> str:
    delegate = build_delegate(conf, load_flannel_env(conf.subnet_file))
    DelegateStore(conf.data_dir).save(call.container_id, delegate)
    out = run_delegate(delegate["type"], delegate, call.environ, "ADD")
    try:
        json.loads(out)
    except ValueError:
        raise CniError(INTERNAL, f"delegate {delegate['type']} gave no JSON result",
                       out[-500:]) from None
    return out


def cmd_del(call: Invocation, conf: PluginConf) -> str:
    """Hand the saved config to the delegate; nothing saved means nothing to undo."""
    store = DelegateStore(conf.data_dir)
    delegate = store.load(call.container_id)
    if delegate is None:
        return ""
    run_delegate(delegate["type"], delegate, call.environ, "DEL")
    store.remove(call.container_id)
    return ""


def cmd_check(call: Invocation, conf: PluginConf) -> str:
    if conf.cni_version in _NO_CHECK:
        raise CniError(INCOMPATIBLE_VERSION, f"CNI {conf.cni_version} has no CHECK")
    if conf.prev_result is None:
        raise CniError(INVALID_NETWORK_CONFIG, "CHECK needs prevResult in the network config")
    delegate = DelegateStore(conf.data_dir).load(call.container_id)
    if delegate is None:
        raise CniError(UNKNOWN_CONTAINER,
                       f"no saved config for container {call.container_id} in {conf.data_dir}"
                       ": it was never added to this network, or already deleted")
    delegate.update(cniVersion=conf.cni_version, prevResult=conf.prev_result)
    run_delegate(delegate["type"], delegate, call.environ, "CHECK")
    return ""


def cmd_version() -> str:
    return json.dumps({"cniVersion": SUPPORTED_VERSIONS[-1],
                       "supportedVersions": list(SUPPORTED_VERSIONS)})


_COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check}


def run(call: Invocation) -> str:
    """What to print on success; CniError otherwise."""
    if call.command == "VERSION":
        return cmd_version()
    if call.command not in _COMMANDS:
        raise CniError(INVALID_ENVIRONMENT,
                       f"unknown CNI_COMMAND {call.command!r} (pyflannel-cni speaks CNI "
                       f"{', '.join(SUPPORTED_VERSIONS)}: ADD, DEL, CHECK, VERSION)")
    call.check_environment()
    return _COMMANDS[call.command](call, parse_plugin_conf(call.stdin))


def _version_for_errors(stdin: bytes) -> str | None:
    """The config's cniVersion if it is one we speak (errors are written in it)."""
    try:
        version = json.loads(stdin).get("cniVersion")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return version if version in SUPPORTED_VERSIONS else None


def main(environ: Mapping[str, str] | None = None, stdin: bytes | None = None) -> int:
    env = dict(os.environ if environ is None else environ)
    data = sys.stdin.buffer.read() if stdin is None else stdin
    call = Invocation(env.get("CNI_COMMAND", ""), env, data)
    try:
        out = run(call)
    except CniError as e:
        print(e.to_json(_version_for_errors(data)))
        print(f"pyflannel-cni: {call.command or '?'}: {e.msg}", file=sys.stderr)
        return 1
    except Exception as e:  # the runtime must still get CNI error JSON
        error = CniError(INTERNAL, f"pyflannel-cni: unexpected {type(e).__name__}: {e}")
        print(error.to_json(_version_for_errors(data)))
        return 1
    if out:
        sys.stdout.write(out if out.endswith("\n") else out + "\n")
    return 0

