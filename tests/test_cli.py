"""CLI surface: every command's --help carries an example; bad usage is one line, exit 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from quantprism.cli import cli

from conftest import assert_one_line_error


def test_every_subcommand_help_has_an_example(run_cli):
    names = sorted(cli.commands)
    assert {"inspect", "targets"} <= set(names)
    rc, out, _ = run_cli("--help")
    assert rc == 0 and "Example" in out
    for name in names:
        rc, out, err = run_cli(name, "--help")
        assert rc == 0, err
        assert "Example" in out and f"quantprism {name}" in out, name


def test_unknown_command_and_option(run_cli):
    rc, _, err = run_cli("frobnicate")
    assert_one_line_error(rc, err, "frobnicate")
    rc, _, err = run_cli("inspect", "--no-such-flag")
    assert_one_line_error(rc, err, "--no-such-flag")


@pytest.mark.slow
def test_console_script_exit_code(tmp_path):
    """The installed entry point: a real process, exit code 2 and no traceback."""
    exe = [sys.executable, "-m", "quantprism.cli"]
    r = subprocess.run(exe + ["targets", str(tmp_path / "missing.toml")], capture_output=True, text=True)
    assert_one_line_error(r.returncode, r.stderr, "missing.toml")
    r = subprocess.run(exe + ["--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "quantprism" in r.stdout
