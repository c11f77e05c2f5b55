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


@pytest.mark.parametrize("cmd", ["build", "quantize"])
@pytest.mark.parametrize("flags, needle", [
    (("--device", "tpu"), "use auto, cpu, cuda or cuda:N"),
    (("--device", "cuda:99"), "--device cuda:99"),  # no CUDA here, or not 100 devices: either way one line
    (("--max-memory", "lots"), "memory size 'lots'"),
    (("--max-memory", "-2GB"), "must be positive"),
])
def test_bad_device_or_memory_is_one_line(tmp_path, run_cli, cmd, flags, needle):
    """Checked before any work starts (no model is read, nothing is written)."""
    rc, _, err = run_cli(cmd, "--targets", "targets.toml", *(("--out", tmp_path / "o") if cmd == "build" else ()),
                         *flags)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "o").exists()
