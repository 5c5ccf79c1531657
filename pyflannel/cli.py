"""Command line: ``pyflanneld`` (the daemon, flanneld's flags) and ``pyflannel <command>``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyflannel import __version__
from pyflannel.flags import FlagError, Options, parse_flags, usage

COMMANDS = """\
usage: pyflannel <command> [flags]

commands:
  run             run the daemon (same as pyflanneld; flanneld's flags)
  status          the cluster's subnet table from etcd (--json, --watch)
  config          get, set or validate the network config (validated before it is stored)
  lease           list, reserve or release subnet leases
  policy          network policy: apply, delete, list, get, trace (docs/policy.md)
  mk-docker-opts  write Docker daemon options from the subnet file (like mk-docker-opts.sh)
  demo            build a local lab (etcd + nodes in network namespaces) and ping across it
  version         print the version
"""


def _parse(prog: str, argv: Sequence[str]) -> Options | None:
    try:
        opts = parse_flags(argv)
    except FlagError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if opts.help:
        print(usage(prog), end="")
        return None
    if opts.version:
        print(__version__)
        return None
    return opts


def etcd_password_given(argv: Sequence[str]) -> str:
    """The value of -etcd-password on a command line (any of the forms flags take), or ''."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == "etcd-password":
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return ""


def hide_etcd_password(argv: Sequence[str]) -> None:
    """Keep a password given on the command line out of `ps`, for every command: the one
    place this rule lives, before any command parses its flags."""
    secret = etcd_password_given(argv)
    if secret:
        from pyflannel.host.cmdline import scrub

        scrub(secret)


def daemon_main(argv: Sequence[str] | None = None, prog: str = "pyflanneld") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    hide_etcd_password(argv)
    opts = _parse(prog, argv)
    if opts is None:
        return 0
    from pyflannel import daemon
    from pyflannel.logutil import setup_logging

    setup_logging(opts.verbosity)
    return daemon.run(opts)


def status_main(argv: Sequence[str]) -> int:
    as_json = False
    watch = 0.0
    rest = []
    for arg in argv:
        if arg in ("--json", "-json"):
            as_json = True
        elif arg in ("--watch", "-watch", "-w"):
            watch = 2.0
        elif arg.startswith(("--watch=", "-watch=")):
            try:
                watch = float(arg.split("=", 1)[1])
            except ValueError:
                print(f"pyflannel status: --watch takes seconds, not {arg}", file=sys.stderr)
                return 2
        else:
            rest.append(arg)
    opts = _parse("pyflannel status", rest)
    if opts is None:
        return 0
    from pyflannel import status

    return status.run(opts, as_json=as_json, watch=watch)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    hide_etcd_password(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(COMMANDS, end="")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        return daemon_main(rest, prog="pyflannel run")
    if cmd == "status":
        return status_main(rest)
    if cmd in ("config", "lease"):
        from pyflannel import admin

        return admin.main(cmd, rest)
    if cmd == "policy":
        from pyflannel.policy import cli as policy_cli

        return policy_cli.main(rest)
    if cmd == "demo":
        from pyflannel import demo

        return demo.main(rest)
    if cmd == "mk-docker-opts":
        from pyflannel import dockeropts

        return dockeropts.main(rest)
    if cmd in ("version", "--version", "-version"):
        print(__version__)
        return 0
    print(f"pyflannel: unknown command {cmd!r}\n\n{COMMANDS}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
