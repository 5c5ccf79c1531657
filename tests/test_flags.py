"""Specification of flanneld's command line and FLANNELD_* environment variables."""

from __future__ import annotations

import dataclasses

import pytest

from pyflannel.flags import FLAGS, FlagError, Options, env_var, parse_flags, usage


def parse(*argv: str, **environ: str) -> Options:
    """Parse with an explicit (usually empty) environment so the runner's env cannot leak in."""
    return parse_flags(list(argv), environ)


def test_no_arguments_gives_flanneld_defaults():
    assert parse() == Options()
    opts = Options()
    assert opts.etcd_endpoints == ("http://127.0.0.1:2379",)
    assert opts.etcd_prefix == "/coreos.com/network"
    assert opts.subnet_file == "/run/flannel/subnet.env"
    assert opts.subnet_lease_renew_margin == 60
    assert opts.ip_masq is False
    assert opts.healthz_ip == "0.0.0.0"
    assert opts.healthz_port == 0
    assert opts.iptables_resync == 5
    assert opts.iptables_forward_rules is True
    assert (opts.verbosity, opts.version, opts.help) == (0, False, False)


def test_flag_table_defaults_match_options_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(Options)}
    assert {spec.field: spec.default for spec in FLAGS} == defaults


# ---------------------------------------------------------------------------------------
# Syntax forms


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["-etcd-prefix=/x"], id="-f=v"),
        pytest.param(["--etcd-prefix=/x"], id="--f=v"),
        pytest.param(["-etcd-prefix", "/x"], id="-f v"),
        pytest.param(["--etcd-prefix", "/x"], id="--f v"),
    ],
)
def test_every_value_form(argv):
    assert parse(*argv).etcd_prefix == "/x"


def test_value_may_contain_equals_and_look_like_a_flag():
    assert parse("-etcd-username=u", "-etcd-password=a=b").etcd_password == "a=b"
    assert parse("-etcd-username=u", "-etcd-password", "-x").etcd_password == "-x"


def test_empty_value_is_allowed_for_strings():
    assert parse("-etcd-keyfile=").etcd_keyfile == ""


def test_last_occurrence_wins():
    assert parse("-subnet-file=/a", "-subnet-file=/b").subnet_file == "/b"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["-ip-masq"], True, id="bare"),
        pytest.param(["--ip-masq"], True, id="bare-double-dash"),
        pytest.param(["-ip-masq=true"], True, id="true"),
        pytest.param(["-ip-masq=false"], False, id="false"),
        pytest.param(["-ip-masq=1"], True, id="1"),
        pytest.param(["-ip-masq=0"], False, id="0"),
        pytest.param(["-ip-masq=t"], True, id="t"),
        pytest.param(["-ip-masq=F"], False, id="F"),
        pytest.param(["-ip-masq=TRUE"], True, id="TRUE"),
        pytest.param(["-ip-masq=False"], False, id="False"),
    ],
)
def test_bool_forms(argv, expected):
    assert parse(*argv).ip_masq is expected


def test_bool_does_not_consume_next_argument():
    opts = parse("-ip-masq", "-etcd-prefix=/x")
    assert opts.ip_masq is True and opts.etcd_prefix == "/x"
    with pytest.raises(FlagError, match="^unexpected argument: false$"):
        parse("-ip-masq", "false")


def test_default_true_bool_can_be_turned_off():
    assert parse("-iptables-forward-rules=false").iptables_forward_rules is False


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        pytest.param(["-v=2"], 2, id="-v=2"),
        pytest.param(["--v=3"], 3, id="--v=3"),
        pytest.param(["-v", "2"], 2, id="-v 2"),
        pytest.param(["-v"], 1, id="bare-at-end"),
        pytest.param(["-v", "-ip-masq"], 1, id="bare-before-flag"),
        pytest.param(["-v=0"], 0, id="-v=0"),
    ],
)
def test_verbosity_forms(argv, level):
    assert parse(*argv).verbosity == level


def test_bare_v_does_not_swallow_non_digit_argument():
    with pytest.raises(FlagError, match="^unexpected argument: 2x$"):
        parse("-v", "2x")


def test_version_and_help():
    assert parse("-version").version is True
    assert parse("--version").version is True
    for spelling in ("-h", "-help", "--help", "--h"):
        assert parse(spelling).help is True


def test_help_stops_parsing_so_it_works_next_to_bad_flags():
    assert parse("-h", "-no-such-flag", "junk").help is True
    assert parse("-help", FLANNELD_SUBNET_LEASE_RENEW_MARGIN="abc").help is True
    assert parse("-help=false").help is False


def test_double_dash_ends_flags():
    assert parse("-ip-masq", "--") == Options(ip_masq=True)
    with pytest.raises(FlagError, match="^unexpected argument: foo$"):
        parse("--", "foo")


# ---------------------------------------------------------------------------------------
# Values and validation


def test_etcd_endpoints_comma_list():
    opts = parse("-etcd-endpoints= http://a:2379 ,https://b:2379,, http://[::1]:2379/")
    assert opts.etcd_endpoints == ("http://a:2379", "https://b:2379", "http://[::1]:2379/")


def test_etcd_prefix_trailing_slash_is_stripped():
    assert parse("-etcd-prefix=/my/net/").etcd_prefix == "/my/net"


def test_repeatable_flags_accumulate_in_order():
    opts = parse("-iface=eth1", "--iface", "eth0", "-iface-regex=^en", "-iface-regex", "^wl")
    assert opts.iface == ("eth1", "eth0")
    assert opts.iface_regex == ("^en", "^wl")


def test_addresses_and_ints():
    opts = parse("-public-ip=192.0.2.1", "-iface-can-reach=8.8.8.8", "-healthz-ip=::",
                 "-healthz-port=8471", "-iptables-resync=30", "-subnet-lease-renew-margin=1439")
    assert opts.public_ip == "192.0.2.1"
    assert opts.iface_can_reach == "8.8.8.8"
    assert opts.healthz_ip == "::"
    assert (opts.healthz_port, opts.iptables_resync, opts.subnet_lease_renew_margin) == (
        8471, 30, 1439)


def test_ip_masq_is_parsed_not_refused():
    assert parse("-ip-masq=true").ip_masq is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["-foo"], "unknown flag: -foo", id="unknown"),
        pytest.param(["--foo=1"], "unknown flag: -foo", id="unknown-with-value"),
        pytest.param(["-Ip-Masq"], "unknown flag: -Ip-Masq", id="names-are-case-sensitive"),
        pytest.param(["-ip_masq"], "unknown flag: -ip_masq", id="underscores-are-not-hyphens"),
        pytest.param(["---ip-masq"], "bad flag syntax: ---ip-masq", id="three-dashes"),
        pytest.param(["-=x"], "bad flag syntax: -=x", id="no-name"),
        pytest.param(["foo"], "unexpected argument: foo", id="positional"),
        pytest.param(["-"], "unexpected argument: -", id="lone-dash"),
        pytest.param(["-etcd-prefix"], "flag -etcd-prefix: needs a value", id="missing-value"),
        pytest.param(["--iface"], "flag -iface: needs a value", id="missing-repeat-value"),
        pytest.param(["-subnet-lease-renew-margin=0"],
                     "flag -subnet-lease-renew-margin: 0 is out of range (1..1439 minutes)",
                     id="margin-0"),
        pytest.param(["-subnet-lease-renew-margin", "1440"],
                     "flag -subnet-lease-renew-margin: 1440 is out of range (1..1439 minutes)",
                     id="margin-1440"),
        pytest.param(["-subnet-lease-renew-margin=abc"],
                     'flag -subnet-lease-renew-margin: "abc" is not an integer', id="bad-int"),
        pytest.param(["-healthz-port= 80"], 'flag -healthz-port: " 80" is not an integer',
                     id="int-with-space"),
        pytest.param(["-healthz-port=1_000"], 'flag -healthz-port: "1_000" is not an integer',
                     id="int-with-underscore"),
        pytest.param(["-healthz-port=65536"], "flag -healthz-port: 65536 is out of range",
                     id="port-too-big"),
        pytest.param(["-healthz-port=-1"], "flag -healthz-port: -1 is out of range",
                     id="port-negative"),
        pytest.param(["-iptables-resync=0"], "flag -iptables-resync: 0 is out of range",
                     id="resync-0"),
        pytest.param(["-v=x"], 'flag -v: "x" is not an integer', id="bad-v"),
        pytest.param(["-v=-1"], "flag -v: -1 is out of range", id="negative-v"),
        pytest.param(["-ip-masq=yes"], 'flag -ip-masq: "yes" is not a boolean', id="bad-bool"),
        pytest.param(["-ip-masq="], 'flag -ip-masq: "" is not a boolean', id="empty-bool"),
        pytest.param(["-etcd-endpoints=127.0.0.1:2379"],
                     'flag -etcd-endpoints: "127.0.0.1:2379" must start with http://',
                     id="endpoint-no-scheme"),
        pytest.param(["-etcd-endpoints=unix:///run/etcd.sock"], "must start with http://",
                     id="endpoint-unix"),
        pytest.param(["-etcd-endpoints=http://etcd"], '"http://etcd" must name host:port',
                     id="endpoint-no-port"),
        pytest.param(["-etcd-endpoints=http://:2379"], "must name host:port",
                     id="endpoint-no-host"),
        pytest.param(["-etcd-endpoints=http://etcd:99999"], "has an invalid port",
                     id="endpoint-bad-port"),
        pytest.param(["-etcd-endpoints=http://u:p@etcd:2379"], "must not contain credentials",
                     id="endpoint-credentials"),
        pytest.param(["-etcd-endpoints=http://etcd:2379/v2/keys"], "must be just scheme://",
                     id="endpoint-path"),
        pytest.param(["-etcd-endpoints=http://et\ncd:2379"], "whitespace or control",
                     id="endpoint-newline"),
        pytest.param(["-etcd-endpoints=http://a:1,ftp://b:2"], '"ftp://b:2" must start',
                     id="one-bad-endpoint-in-list"),
        pytest.param(["-etcd-endpoints= , "], "flag -etcd-endpoints: no endpoints given",
                     id="endpoints-empty"),
        pytest.param(["-etcd-prefix=coreos.com/network"],
                     'flag -etcd-prefix: "coreos.com/network" must start with /',
                     id="prefix-relative"),
        pytest.param(["-etcd-prefix=/"], "must name a key below /", id="prefix-root"),
        pytest.param(["-iface-regex=("], 'flag -iface-regex: "(" is not a valid regular',
                     id="bad-regex"),
        pytest.param(["-iface="], "flag -iface: empty value", id="empty-iface"),
        pytest.param(["-public-ip=1.2.3"], 'flag -public-ip: "1.2.3" is not an IPv4 address',
                     id="bad-public-ip"),
        pytest.param(["-public-ip=::1"], "is not an IPv4 address", id="ipv6-public-ip"),
        pytest.param(["-iface-can-reach=example.com"],
                     'flag -iface-can-reach: "example.com" is not an IPv4 address',
                     id="bad-can-reach"),
        pytest.param(["-healthz-ip=localhost"], 'flag -healthz-ip: "localhost" is not an IP',
                     id="bad-healthz-ip"),
        pytest.param(["-help=maybe"], 'flag -help: "maybe" is not a boolean', id="bad-help"),
        pytest.param(["-foo\nbar"], 'unknown flag: -"foo\\nbar"', id="newline-in-name"),
    ],
)
def test_errors(argv, message):
    with pytest.raises(FlagError) as info:
        parse(*argv)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_flag_error_is_a_value_error():
    assert issubclass(FlagError, ValueError)


# ---------------------------------------------------------------------------------------
# Environment


def test_env_var_names():
    names = {spec.name: env_var(spec) for spec in FLAGS if spec.env}
    assert names["etcd-endpoints"] == "FLANNELD_ETCD_ENDPOINTS"
    assert names["subnet-lease-renew-margin"] == "FLANNELD_SUBNET_LEASE_RENEW_MARGIN"
    assert names["ip-masq"] == "FLANNELD_IP_MASQ"
    assert {"v", "version", "help"}.isdisjoint(names)


def test_env_sets_every_kind():
    opts = parse(
        FLANNELD_ETCD_ENDPOINTS="http://a:2379, http://b:2379",
        FLANNELD_ETCD_PREFIX="/env/net/",
        FLANNELD_ETCD_USERNAME="flannel",
        FLANNELD_ETCD_PASSWORD="hunter2",
        FLANNELD_IFACE="eth0, eth1,",
        FLANNELD_IFACE_REGEX="^en",
        FLANNELD_SUBNET_LEASE_RENEW_MARGIN="30",
        FLANNELD_IP_MASQ="true",
        FLANNELD_IPTABLES_FORWARD_RULES="0",
    )
    assert opts.etcd_endpoints == ("http://a:2379", "http://b:2379")
    assert opts.etcd_prefix == "/env/net"
    assert opts.etcd_password == "hunter2"
    assert opts.iface == ("eth0", "eth1")
    assert opts.iface_regex == ("^en",)
    assert opts.subnet_lease_renew_margin == 30
    assert opts.ip_masq is True
    assert opts.iptables_forward_rules is False


def test_command_line_wins_over_env_per_flag():
    opts = parse("-subnet-lease-renew-margin=10", FLANNELD_SUBNET_LEASE_RENEW_MARGIN="30",
                 FLANNELD_SUBNET_FILE="/env.env")
    assert opts.subnet_lease_renew_margin == 10
    assert opts.subnet_file == "/env.env"
    assert parse("-ip-masq=false", FLANNELD_IP_MASQ="true").ip_masq is False


def test_repeatable_on_command_line_replaces_env_list():
    opts = parse("-iface=eth9", FLANNELD_IFACE="eth0,eth1")
    assert opts.iface == ("eth9",)


def test_empty_env_var_is_unset():
    assert parse(FLANNELD_ETCD_PREFIX="", FLANNELD_IP_MASQ="") == Options()


def test_env_is_ignored_for_v_version_help():
    assert parse(FLANNELD_V="3", FLANNELD_VERSION="true", FLANNELD_HELP="true") == Options()


def test_environ_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("FLANNELD_ETCD_PREFIX", "/from/os")
    assert parse_flags([]).etcd_prefix == "/from/os"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        pytest.param({"FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "abc"},
                     'FLANNELD_SUBNET_LEASE_RENEW_MARGIN: "abc" is not an integer',
                     id="bad-int"),
        pytest.param({"FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "0"},
                     "FLANNELD_SUBNET_LEASE_RENEW_MARGIN: 0 is out of range (1..1439 minutes)",
                     id="out-of-range"),
        pytest.param({"FLANNELD_IP_MASQ": "yes"}, 'FLANNELD_IP_MASQ: "yes" is not a boolean',
                     id="bad-bool"),
        pytest.param({"FLANNELD_ETCD_ENDPOINTS": "etcd:2379"},
                     'FLANNELD_ETCD_ENDPOINTS: "etcd:2379" must start with http://',
                     id="bad-endpoint"),
        pytest.param({"FLANNELD_IFACE_REGEX": "ok,(("}, 'FLANNELD_IFACE_REGEX: "((" is not',
                     id="bad-regex-in-list"),
        pytest.param({"FLANNELD_PUBLIC_IP": "300.1.1.1"}, "FLANNELD_PUBLIC_IP:",
                     id="bad-ip"),
    ],
)
def test_env_errors_name_the_variable(environ, message):
    with pytest.raises(FlagError) as info:
        parse_flags([], environ)
    assert str(info.value).startswith(message)


def test_env_is_not_read_for_a_flag_given_on_the_command_line():
    # As in flanneld: the variable is consulted only for flags the command line left unset.
    assert parse("-healthz-port=1", FLANNELD_HEALTHZ_PORT="x").healthz_port == 1
    with pytest.raises(FlagError, match="FLANNELD_HEALTHZ_PORT"):
        parse("-ip-masq", FLANNELD_HEALTHZ_PORT="x")


# ---------------------------------------------------------------------------------------
# Secrets and help


def test_repr_never_shows_the_password():
    opts = parse("-etcd-password=s3cr3t-pw", "-etcd-username=root")
    for text in (repr(opts), str(opts), f"{opts}", repr([opts])):
        assert "s3cr3t-pw" not in text
        assert "etcd_password='***'" in text
        assert "etcd_username='root'" in text
    assert opts.etcd_password == "s3cr3t-pw"
    assert opts.redacted()["etcd_password"] == "***"


def test_repr_shows_empty_password_as_empty():
    assert "etcd_password=''" in repr(Options())


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Options().ip_masq = True  # type: ignore[misc]


def test_usage_lists_every_flag_with_default():
    text = usage()
    for spec in FLAGS:
        if spec.hidden:
            assert f"-{spec.name} " not in text  # documented in docs/operations.md instead
            continue
        assert f"-{spec.name}" in text
        if spec.env:
            assert env_var(spec) in text
    assert '(default "/coreos.com/network"' in text
    assert "(default 60;" in text
    assert "-h, -help" in text
