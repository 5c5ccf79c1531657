"""``pyflannel mk-docker-opts`` must write exactly the bytes ``mk-docker-opts.sh`` writes.

The golden strings below are the reference: Docker units parse this file, so any byte of
difference (quoting, spacing, order, trailing newline) is a regression.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyflannel import cli, dockeropts
from pyflannel.dockeropts import DockerOptsError, main, render

REPO = Path(__file__).resolve().parent.parent

SUBNET_ENV = (
    "FLANNEL_NETWORK=10.1.0.0/16\n"
    "FLANNEL_SUBNET=10.1.80.1/24\n"
    "FLANNEL_MTU=1472\n"
    "FLANNEL_IPMASQ=false\n"
)

BIP = 'DOCKER_OPT_BIP="--bip=10.1.80.1/24"\n'
MASQ = 'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
MTU = 'DOCKER_OPT_MTU="--mtu=1472"\n'
ALL = " --bip=10.1.80.1/24 --ip-masq=true --mtu=1472"
NO_MASQ = " --bip=10.1.80.1/24 --mtu=1472"


@pytest.fixture
def subnet_file(tmp_path: Path) -> Path:
    path = tmp_path / "subnet.env"
    path.write_text(SUBNET_ENV)
    return path


def run(subnet: Path, out: Path, *flags: str, environ: dict[str, str] | None = None) -> str:
    """Run main() with an explicit environment so the runner's own env cannot leak in."""
    rc = main(["-f", str(subnet), "-d", str(out), *flags], environ or {})
    assert rc == 0
    return out.read_bytes().decode()


# ---------------------------------------------------------------------------------------
# Golden outputs per flag combination


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ((), BIP + MASQ + MTU + f'DOCKER_OPTS="{ALL}"\n'),
        (("-i",), BIP + MASQ + MTU),
        (("-c",), f'DOCKER_OPTS="{ALL}"\n'),
        (("-i", "-c"), BIP + MASQ + MTU + f'DOCKER_OPTS="{ALL}"\n'),
        (("-ci",), BIP + MASQ + MTU + f'DOCKER_OPTS="{ALL}"\n'),
        (("-m",), BIP + MTU + f'DOCKER_OPTS="{NO_MASQ}"\n'),
        (("-i", "-m"), BIP + MTU),
        (("-c", "-m"), f'DOCKER_OPTS="{NO_MASQ}"\n'),
        (("-i", "-c", "-m"), BIP + MTU + f'DOCKER_OPTS="{NO_MASQ}"\n'),
        (("-k", "DOCKER_NETWORK_OPTIONS"), BIP + MASQ + MTU + f'DOCKER_NETWORK_OPTIONS="{ALL}"\n'),
        (("-kDOCKER_NETWORK_OPTIONS",), BIP + MASQ + MTU + f'DOCKER_NETWORK_OPTIONS="{ALL}"\n'),
        (("-c", "-m", "-k", "X"), f'X="{NO_MASQ}"\n'),
        (("-cmk", "X"), f'X="{NO_MASQ}"\n'),
        (("-i", "-k", "X"), BIP + MASQ + MTU),
    ],
)
def test_golden_output(subnet_file: Path, tmp_path: Path, flags: tuple[str, ...], expected: str):
    assert run(subnet_file, tmp_path / "docker_opts.env", *flags) == expected


def test_golden_example_exact_bytes(subnet_file: Path, tmp_path: Path):
    out = tmp_path / "docker_opts.env"
    run(subnet_file, out, "-k", "DOCKER_NETWORK_OPTIONS")
    assert out.read_bytes() == (
        b'DOCKER_OPT_BIP="--bip=10.1.80.1/24"\n'
        b'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        b'DOCKER_OPT_MTU="--mtu=1472"\n'
        b'DOCKER_NETWORK_OPTIONS=" --bip=10.1.80.1/24 --ip-masq=true --mtu=1472"\n'
    )


def test_attached_file_arguments(subnet_file: Path, tmp_path: Path):
    out = tmp_path / "o.env"
    assert main([f"-f{subnet_file}", f"-d{out}", "-c"], {}) == 0
    assert out.read_text() == f'DOCKER_OPTS="{ALL}"\n'


def test_flannel_ipmasq_true_turns_docker_masquerading_off(tmp_path: Path):
    subnet = tmp_path / "subnet.env"
    subnet.write_text(SUBNET_ENV.replace("IPMASQ=false", "IPMASQ=true"))
    assert run(subnet, tmp_path / "o.env") == (
        BIP
        + 'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
        + MTU
        + 'DOCKER_OPTS=" --bip=10.1.80.1/24 --ip-masq=false --mtu=1472"\n'
    )


def test_quoted_values_in_subnet_file(tmp_path: Path):
    subnet = tmp_path / "subnet.env"
    subnet.write_text('FLANNEL_SUBNET="10.1.80.1/24"\nFLANNEL_MTU=\'1472\'\n')
    assert run(subnet, tmp_path / "o.env", "-c") == f'DOCKER_OPTS="{NO_MASQ}"\n'


# ---------------------------------------------------------------------------------------
# The environment


def test_existing_combined_variable_is_prefixed_with_extra_space(subnet_file, tmp_path):
    got = run(subnet_file, tmp_path / "o.env", "-c", environ={"DOCKER_OPTS": "-H unix:///x"})
    assert got == f'DOCKER_OPTS="-H unix:///x {ALL}"\n'
    assert got == 'DOCKER_OPTS="-H unix:///x  --bip=10.1.80.1/24 --ip-masq=true --mtu=1472"\n'


def test_combined_variable_follows_k(subnet_file, tmp_path):
    environ = {"DOCKER_OPTS": "-H unix:///x", "NET": "--debug"}
    got = run(subnet_file, tmp_path / "o.env", "-c", "-k", "NET", environ=environ)
    assert got == f'NET="--debug {ALL}"\n'


def test_existing_docker_opt_variables_are_included_in_order(subnet_file, tmp_path):
    environ = {"DOCKER_OPT_FOO": "--foo", "DOCKER_OPT_AAA": "--aaa", "PATH": "/bin"}
    assert run(subnet_file, tmp_path / "o.env", environ=environ) == (
        'DOCKER_OPT_AAA="--aaa"\n'
        + BIP
        + 'DOCKER_OPT_FOO="--foo"\n'
        + MASQ
        + MTU
        + 'DOCKER_OPTS=" --aaa --bip=10.1.80.1/24 --foo --ip-masq=true --mtu=1472"\n'
    )


def test_opts_and_opt_variables_together(subnet_file, tmp_path):
    environ = {"DOCKER_OPTS": "-H unix:///x", "DOCKER_OPT_FOO": "--foo"}
    assert run(subnet_file, tmp_path / "o.env", "-m", environ=environ) == (
        BIP
        + 'DOCKER_OPT_FOO="--foo"\n'
        + MTU
        + 'DOCKER_OPTS="-H unix:///x  --bip=10.1.80.1/24 --foo --mtu=1472"\n'
    )


def test_subnet_file_overrides_environment(subnet_file, tmp_path):
    environ = {"FLANNEL_SUBNET": "192.168.0.1/24", "FLANNEL_MTU": "9000"}
    assert run(subnet_file, tmp_path / "o.env", "-c", environ=environ) == f'DOCKER_OPTS="{ALL}"\n'


def test_environment_used_when_file_lacks_a_key(tmp_path):
    subnet = tmp_path / "subnet.env"
    subnet.write_text("FLANNEL_SUBNET=10.1.80.1/24\n")
    got = run(subnet, tmp_path / "o.env", "-c", environ={"FLANNEL_MTU": "1400"})
    assert got == 'DOCKER_OPTS=" --bip=10.1.80.1/24 --mtu=1400"\n'


def test_empty_docker_opt_variable_still_counts(subnet_file, tmp_path):
    got = run(subnet_file, tmp_path / "o.env", "-m", environ={"DOCKER_OPT_Z": ""})
    assert got == (
        BIP + MTU + 'DOCKER_OPT_Z=""\n' + 'DOCKER_OPTS=" --bip=10.1.80.1/24 --mtu=1472 "\n'
    )


def test_variables_mentioning_docker_opt_in_value_count_like_in_set_output(tmp_path):
    # The script greps `set` lines, so a value naming DOCKER_OPT_ qualifies its variable.
    environ = {"REF": "DOCKER_OPT_X", "OTHER": "x"}
    assert run(tmp_path / "nope.env", tmp_path / "o.env", environ=environ) == (
        'REF="DOCKER_OPT_X"\nDOCKER_OPTS=" DOCKER_OPT_X"\n'
    )


def test_missing_subnet_file_is_not_an_error(tmp_path):
    missing = tmp_path / "nope.env"
    out = tmp_path / "o.env"
    assert run(missing, out) == 'DOCKER_OPTS=""\n'
    assert run(missing, out, "-i") == ""
    environ = {"DOCKER_OPTS": "-H unix:///x", "DOCKER_OPT_FOO": "--foo"}
    assert run(missing, out, environ=environ) == (
        'DOCKER_OPT_FOO="--foo"\nDOCKER_OPTS="-H unix:///x  --foo"\n'
    )


def test_environment_defaults_to_os_environ(subnet_file, tmp_path, monkeypatch):
    for name in list(os.environ):
        if "DOCKER_OPT" in name:
            monkeypatch.delenv(name)
    monkeypatch.setenv("DOCKER_OPTS", "-H unix:///x")
    out = tmp_path / "o.env"
    assert main(["-f", str(subnet_file), "-d", str(out), "-c"]) == 0
    assert out.read_text() == f'DOCKER_OPTS="-H unix:///x {ALL}"\n'


# ---------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("flags", [(), ("-i",), ("-c",)])
def test_invalid_ipmasq_fails_and_leaves_file_alone(tmp_path, capsys, flags):
    subnet = tmp_path / "subnet.env"
    subnet.write_text(SUBNET_ENV.replace("IPMASQ=false", "IPMASQ=yes"))
    out = tmp_path / "o.env"
    out.write_text("untouched\n")
    assert main(["-f", str(subnet), "-d", str(out), *flags], {}) == 1
    captured = capsys.readouterr()
    assert captured.out == "Invalid value of FLANNEL_IPMASQ: yes\n"
    assert out.read_text() == "untouched\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.env", "subnet.env"]


def test_invalid_ipmasq_is_ignored_with_m(tmp_path):
    subnet = tmp_path / "subnet.env"
    subnet.write_text(SUBNET_ENV.replace("IPMASQ=false", "IPMASQ=yes"))
    assert run(subnet, tmp_path / "o.env", "-c", "-m") == f'DOCKER_OPTS="{NO_MASQ}"\n'


def test_render_raises_for_invalid_ipmasq():
    with pytest.raises(DockerOptsError, match="Invalid value of FLANNEL_IPMASQ: 1"):
        render({"FLANNEL_IPMASQ": "1"}, {}, individual=True, combined=True,
               key="DOCKER_OPTS", ipmasq=True)


@pytest.mark.parametrize("argv", [["-x"], ["-c", "-x"], ["--help"], ["-f"], ["-ck"]])
def test_bad_flags_print_reason_and_usage_and_exit_1(tmp_path, capsys, argv):
    out = tmp_path / "o.env"
    assert main([*argv], {}) == 1
    err = capsys.readouterr().err
    first, rest = err.split("\n", 1)
    assert first.startswith("pyflannel mk-docker-opts: ")
    assert "illegal option" in first or "requires an argument" in first
    assert rest.startswith("usage: pyflannel mk-docker-opts")
    assert not out.exists()


@pytest.mark.parametrize("flag", ["-h", "-?"])
def test_help_goes_to_stderr_and_exits_1_like_the_script(capsys, flag):
    assert main([flag], {}) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: pyflannel mk-docker-opts")
    assert "-k KEY" in captured.err


def test_invalid_key_is_refused(subnet_file, tmp_path, capsys):
    out = tmp_path / "o.env"
    assert main(["-f", str(subnet_file), "-d", str(out), "-k", "A-B"], {}) == 1
    assert "not a valid variable name" in capsys.readouterr().err
    assert not out.exists()


def test_operands_end_option_parsing(subnet_file, tmp_path):
    out = tmp_path / "o.env"
    assert main(["-f", str(subnet_file), "-d", str(out), "-c", "extra", "-i"], {}) == 0
    assert out.read_text() == f'DOCKER_OPTS="{ALL}"\n'


# ---------------------------------------------------------------------------------------
# Writing the file


def test_parent_directory_is_created(subnet_file, tmp_path):
    out = tmp_path / "a" / "b" / "docker_opts.env"
    assert run(subnet_file, out, "-c") == f'DOCKER_OPTS="{ALL}"\n'


def test_existing_file_replaced_and_mode_kept(subnet_file, tmp_path):
    out = tmp_path / "o.env"
    out.write_text("old content that is much longer than the new one\n" * 10)
    out.chmod(0o640)
    assert run(subnet_file, out, "-c") == f'DOCKER_OPTS="{ALL}"\n'
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.env", "subnet.env"]


def test_new_file_mode_follows_umask(subnet_file, tmp_path):
    old = os.umask(0o027)
    try:
        out = tmp_path / "o.env"
        run(subnet_file, out, "-c")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def test_symlinked_output_is_written_through(subnet_file, tmp_path):
    real = tmp_path / "real.env"
    link = tmp_path / "link.env"
    link.symlink_to(real)
    run(subnet_file, link, "-c")
    assert link.is_symlink()
    assert real.read_text() == f'DOCKER_OPTS="{ALL}"\n'


# ---------------------------------------------------------------------------------------
# Properties


_names = st.from_regex(r"DOCKER_OPT_[A-Z0-9_]{1,8}", fullmatch=True)
_values = st.from_regex(r"--[a-z0-9=./-]{0,12}", fullmatch=True)


@given(st.dictionaries(_names, _values, max_size=5), st.booleans())
def test_combined_is_the_individual_values_in_order(extra, ipmasq):
    subnet = {"FLANNEL_SUBNET": "10.1.80.1/24", "FLANNEL_MTU": "1472", "FLANNEL_IPMASQ": "true"}
    text = render(subnet, extra, individual=True, combined=True, key="K", ipmasq=ipmasq)
    assert text.endswith("\n")
    *singles, last = text.splitlines()
    names = [line.split("=", 1)[0] for line in singles]
    assert names == sorted(names)
    values = [line.split("=", 1)[1][1:-1] for line in singles]
    assert last == 'K="' + "".join(f" {v}" for v in values) + '"'
    only_combined = render(subnet, extra, individual=False, combined=True, key="K", ipmasq=ipmasq)
    assert only_combined == last + "\n"


# ---------------------------------------------------------------------------------------
# Through the command line


def test_cli_dispatches(subnet_file, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(dockeropts, "main", lambda argv: calls.append(argv) or 0)
    assert cli.main(["mk-docker-opts", "-c"]) == 0
    assert calls == [["-c"]]
    assert "mk-docker-opts" in cli.COMMANDS


def test_end_to_end_python_m(subnet_file, tmp_path):
    out = tmp_path / "run" / "docker_opts.env"
    env = {k: v for k, v in os.environ.items() if "DOCKER_OPT" not in k + v}
    env["DOCKER_OPT_FOO"] = "--foo"
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "pyflannel", "mk-docker-opts",
         "-f", str(subnet_file), "-d", str(out), "-k", "DOCKER_NETWORK_OPTIONS"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert out.read_bytes() == (
        BIP + 'DOCKER_OPT_FOO="--foo"\n' + MASQ + MTU
        + 'DOCKER_NETWORK_OPTIONS=" --bip=10.1.80.1/24 --foo --ip-masq=true --mtu=1472"\n'
    ).encode()


def test_end_to_end_invalid_ipmasq(tmp_path):
    subnet = tmp_path / "subnet.env"
    subnet.write_text("FLANNEL_IPMASQ=maybe\n")
    out = tmp_path / "o.env"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pyflannel", "mk-docker-opts", "-f", str(subnet), "-d", str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (1, "Invalid value of FLANNEL_IPMASQ: maybe\n")
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# Dual-stack subnet files. flannel's script has no IPv6 options: FLANNEL_IPV6_* lines change
# nothing, and an IPv6-only file (no FLANNEL_SUBNET) has no --bip. These golden outputs are
# the script's own bytes for these inputs.

DUAL_STACK_ENV = (
    "FLANNEL_NETWORK=10.1.0.0/16\n"
    "FLANNEL_SUBNET=10.1.86.1/24\n"
    "FLANNEL_IPV6_NETWORK=fc00:10:1::/48\n"
    "FLANNEL_IPV6_SUBNET=fc00:10:1:5c::1/64\n"
    "FLANNEL_MTU=1450\n"
    "FLANNEL_IPMASQ=false\n"
)
IPV6_ONLY_ENV = (
    "FLANNEL_IPV6_NETWORK=fc00:10:1::/48\n"
    "FLANNEL_IPV6_SUBNET=fc00:10:1:5c::1/64\n"
    "FLANNEL_MTU=1450\n"
    "FLANNEL_IPMASQ=true\n"
)

D_BIP = 'DOCKER_OPT_BIP="--bip=10.1.86.1/24"\n'
D_MASQ = 'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
D_MTU = 'DOCKER_OPT_MTU="--mtu=1450"\n'
V6_MASQ = 'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ((), D_BIP + D_MASQ + D_MTU
         + 'DOCKER_OPTS=" --bip=10.1.86.1/24 --ip-masq=true --mtu=1450"\n'),
        (("-i",), D_BIP + D_MASQ + D_MTU),
        (("-c",), 'DOCKER_OPTS=" --bip=10.1.86.1/24 --ip-masq=true --mtu=1450"\n'),
        (("-m",), D_BIP + D_MTU + 'DOCKER_OPTS=" --bip=10.1.86.1/24 --mtu=1450"\n'),
        (("-i", "-m"), D_BIP + D_MTU),
        (("-c", "-m", "-k", "X"), 'X=" --bip=10.1.86.1/24 --mtu=1450"\n'),
        (("-k", "DOCKER_NETWORK_OPTIONS"), D_BIP + D_MASQ + D_MTU
         + 'DOCKER_NETWORK_OPTIONS=" --bip=10.1.86.1/24 --ip-masq=true --mtu=1450"\n'),
    ],
)
def test_dual_stack_subnet_file_gives_the_ipv4_options_only(tmp_path: Path, flags, expected):
    subnet = tmp_path / "subnet.env"
    subnet.write_text(DUAL_STACK_ENV)
    assert run(subnet, tmp_path / "docker_opts.env", *flags) == expected


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ((), V6_MASQ + D_MTU + 'DOCKER_OPTS=" --ip-masq=false --mtu=1450"\n'),
        (("-i",), V6_MASQ + D_MTU),
        (("-c",), 'DOCKER_OPTS=" --ip-masq=false --mtu=1450"\n'),
        (("-m",), D_MTU + 'DOCKER_OPTS=" --mtu=1450"\n'),
        (("-i", "-m"), D_MTU),
        (("-c", "-m", "-k", "X"), 'X=" --mtu=1450"\n'),
        (("-k", "DOCKER_NETWORK_OPTIONS"), V6_MASQ + D_MTU
         + 'DOCKER_NETWORK_OPTIONS=" --ip-masq=false --mtu=1450"\n'),
    ],
)
def test_ipv6_only_subnet_file_has_no_bip(tmp_path: Path, flags, expected):
    subnet = tmp_path / "subnet.env"
    subnet.write_text(IPV6_ONLY_ENV)
    assert run(subnet, tmp_path / "docker_opts.env", *flags) == expected


def test_ipv6_lines_do_not_change_the_output(tmp_path: Path):
    v4_only = "".join(line for line in DUAL_STACK_ENV.splitlines(keepends=True)
                      if "IPV6" not in line)
    a, b = tmp_path / "a.env", tmp_path / "b.env"
    a.write_text(DUAL_STACK_ENV)
    b.write_text(v4_only)
    assert run(a, tmp_path / "a.out") == run(b, tmp_path / "b.out")


def test_render_of_a_dual_stack_subnet_env_names_no_ipv6_option():
    env = {"FLANNEL_SUBNET": "10.1.86.1/24", "FLANNEL_IPV6_SUBNET": "fc00:10:1:5c::1/64",
           "FLANNEL_IPV6_NETWORK": "fc00:10:1::/48", "FLANNEL_MTU": "1450"}
    text = render(env, {}, individual=True, combined=True, key="DOCKER_OPTS", ipmasq=True)
    assert "ipv6" not in text.lower() and "fixed-cidr" not in text
