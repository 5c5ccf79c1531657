"""``-help`` prints one usage line, naming the program that was run."""

from __future__ import annotations

import pytest

from pyflannel import cli


@pytest.mark.parametrize(("argv", "prog"), [
    (["run", "--help"], "pyflannel run"),
    (["status", "-help"], "pyflannel status"),
])
def test_help_has_exactly_one_usage_line(capsys, argv, prog):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.lower().count("usage:") == 1
    assert out.startswith(f"Usage: {prog} [flags]\n")


def test_pyflanneld_help_names_pyflanneld(capsys):
    assert cli.daemon_main(["-h"]) == 0
    out = capsys.readouterr().out
    assert out.lower().count("usage:") == 1 and out.startswith("Usage: pyflanneld [flags]\n")
