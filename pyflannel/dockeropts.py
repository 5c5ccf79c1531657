"""``pyflannel mk-docker-opts``: turn flannel's subnet file into Docker daemon options.

flannel ships a shell helper, ``mk-docker-opts.sh``, that systemd units run after flanneld
to hand the node's subnet, MTU and masquerade setting to dockerd. Units and Docker
drop-ins depend on the exact bytes of the file it writes, so this command reproduces that
output byte for byte, with the same flags, defaults and exit statuses.

Model of the script kept here: its shell variables are the process environment (names that
are valid shell identifiers) overlaid by the sourced subnet file plus the computed
``DOCKER_OPT_*`` options; every variable whose ``set`` line mentions ``DOCKER_OPT_`` (in its
name or value) is emitted, sorted by name in byte order (the C locale's ``set`` order).

Dual-stack: flannel's script has no IPv6 options (no ``--ipv6``, no ``--fixed-cidr-v6``), so
``FLANNEL_IPV6_NETWORK``/``FLANNEL_IPV6_SUBNET`` change nothing and an IPv6-only file (no
``FLANNEL_SUBNET``) gives no ``--bip``; this command does the same, so units that run
either one get the same file.  Docker's IPv6 bridge is configured outside this file.

Deliberate differences, none of which change the output of a working setup:

* the parent directory of the output file is created when missing (the script fails);
* the file is replaced atomically (temp file + rename), so dockerd never reads half of it;
  an existing file's mode and, where permitted, owner are kept, and a symlink is followed;
* a ``-k`` that is not a shell identifier is refused (the script would ``eval`` it);
* values holding whitespace or shell metacharacters are taken literally, where the script
  word-splits its ``set`` output and writes mangled extra entries; the script's own
  internal variables never appear in the output.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pyflannel.host.subnetfile import read_env_file

PROG = "pyflannel mk-docker-opts"
DEFAULT_SUBNET_ENV = "/run/flannel/subnet.env"
DEFAULT_DOCKER_ENV = "/run/docker_opts.env"
DEFAULT_KEY = "DOCKER_OPTS"
MARKER = "DOCKER_OPT_"

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

USAGE = f"""\
usage: {PROG} [-f SUBNET-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

Write Docker daemon options derived from flannel's subnet file.

options:
  -f FILE  subnet file to read (default {DEFAULT_SUBNET_ENV})
  -d FILE  Docker environment file to write (default {DEFAULT_DOCKER_ENV})
  -i       write each option as its own DOCKER_OPT_* variable
  -c       write all options as one combined variable
  -k KEY   name of the combined variable (default {DEFAULT_KEY})
  -m       leave out --ip-masq
  -h, -?   show this help

Without -i and -c both are written.
"""


class DockerOptsError(ValueError):
    """The subnet file holds a value Docker options cannot be made from."""


class _UsageError(Exception):
    """Bad command line; ``str(self)`` is the one-line reason ("" for plain help)."""


@dataclass
class _Args:
    subnet_env: str = DEFAULT_SUBNET_ENV
    docker_env: str = DEFAULT_DOCKER_ENV
    individual: bool = False
    combined: bool = False
    key: str = DEFAULT_KEY
    ipmasq: bool = True


def _parse(argv: list[str]) -> _Args:
    """getopts-style: clustered flags (``-ci``), attached values (``-fFILE``), ``--`` ends."""
    args = _Args()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            break  # like getopts: the first operand ends option parsing; operands are ignored
        j = 1
        while j < len(arg):
            ch = arg[j]
            if ch in "fdk":
                if j + 1 < len(arg):
                    value = arg[j + 1 :]
                elif i + 1 < len(argv):
                    i += 1
                    value = argv[i]
                else:
                    raise _UsageError(f"option requires an argument -- {ch}")
                if ch == "f":
                    args.subnet_env = value
                elif ch == "d":
                    args.docker_env = value
                else:
                    args.key = value
                break
            if ch == "i":
                args.individual = True
            elif ch == "c":
                args.combined = True
            elif ch == "m":
                args.ipmasq = False
            elif ch in "h?":
                raise _UsageError("")
            else:
                raise _UsageError(f"illegal option -- {ch}")
            j += 1
        i += 1
    if not args.individual and not args.combined:
        args.individual = args.combined = True
    return args


def load_subnet_env(path: str | Path) -> dict[str, str]:
    """What sourcing the file would assign; a missing file assigns nothing, as in the script."""
    if not os.path.isfile(path):
        return {}
    out: dict[str, str] = {}
    for key, value in read_env_file(path).items():
        name = key.removeprefix("export ").strip()
        if _IDENT.match(name):
            out[name] = value
    return out


def render(
    subnet_env: Mapping[str, str],
    environ: Mapping[str, str],
    *,
    individual: bool,
    combined: bool,
    key: str,
    ipmasq: bool,
) -> str:
    """The Docker env file's exact text; pure so every flag combination is testable."""
    shell = {k: v for k, v in environ.items() if _IDENT.match(k)}
    shell.update((k, v) for k, v in subnet_env.items() if _IDENT.match(k))

    if subnet := shell.get("FLANNEL_SUBNET", ""):
        shell["DOCKER_OPT_BIP"] = f"--bip={subnet}"
    if mtu := shell.get("FLANNEL_MTU", ""):
        shell["DOCKER_OPT_MTU"] = f"--mtu={mtu}"
    masq = shell.get("FLANNEL_IPMASQ", "")
    if masq and ipmasq:
        # flanneld masquerading itself means Docker must not do it too, and vice versa.
        if masq == "true":
            shell["DOCKER_OPT_IPMASQ"] = "--ip-masq=false"
        elif masq == "false":
            shell["DOCKER_OPT_IPMASQ"] = "--ip-masq=true"
        else:
            raise DockerOptsError(f"Invalid value of FLANNEL_IPMASQ: {masq}")

    joined = shell.get(key, "")
    if joined:
        joined += " "
    lines = []
    for name in sorted(n for n, v in shell.items() if MARKER in n or MARKER in v):
        value = shell[name]
        if individual:
            lines.append(f'{name}="{value}"\n')
        joined += f" {value}"
    if combined:
        lines.append(f'{key}="{joined}"\n')
    return "".join(lines)


def write_atomically(path: str | Path, text: str) -> None:
    """Replace ``path`` in one step so dockerd never starts from a truncated file; like a
    shell redirection, keep an existing file's mode and owner and follow a symlink."""
    from pyflannel.host.atomicfile import write_atomic

    write_atomic(path, text, mode=None)


def main(argv: list[str], environ: Mapping[str, str] | None = None) -> int:
    """Entry point; exit statuses and messages follow ``mk-docker-opts.sh``."""
    environ = os.environ if environ is None else environ
    try:
        args = _parse(list(argv))
    except _UsageError as e:
        # The script prints usage on stderr and exits 1 for -h as well as for bad flags.
        if str(e):
            print(f"{PROG}: {e}", file=sys.stderr)
        print(USAGE, file=sys.stderr, end="")
        return 1
    if not _IDENT.match(args.key):
        print(f"{PROG}: -k {args.key!r} is not a valid variable name", file=sys.stderr)
        return 1
    if not args.docker_env:
        print(f"{PROG}: -d needs a file name", file=sys.stderr)
        return 1

    try:
        subnet_env = load_subnet_env(args.subnet_env) if args.subnet_env else {}
    except (OSError, UnicodeDecodeError) as e:
        # A failed `source` does not stop the script either; it carries on without it.
        print(f"{PROG}: {args.subnet_env}: {e}", file=sys.stderr)
        subnet_env = {}

    try:
        text = render(
            subnet_env,
            environ,
            individual=args.individual,
            combined=args.combined,
            key=args.key,
            ipmasq=args.ipmasq,
        )
    except DockerOptsError as e:
        print(e)  # on stdout, as the script does; the output file is left alone
        return 1

    try:
        write_atomically(args.docker_env, text)
    except OSError as e:
        print(f"{PROG}: {args.docker_env}: {e}", file=sys.stderr)
        return 1
    return 0
