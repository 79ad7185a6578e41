"""Every `genofed` command answers --help, and user errors are one line without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from simulations.cli import build_parser, main

COMMANDS = [
    [], ["keygen"], ["vault"], ["vault", "import"], ["vault", "inspect"], ["vault", "verify"], ["vault", "rekey"],
    ["ledger"], ["ledger", "show"], ["ledger", "set-budget"], ["ledger", "policy"], ["ledger", "egress"], ["certs"], ["cohort"], ["cohort", "synth"],
    ["cohort", "split"], ["cohort", "recipe"], ["evaluate"], ["pretrain"], ["simulate"], ["report"], ["demo"], ["supernode"], ["bench"],
    ["predict"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "genofed")
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: genofed") and len(out.splitlines()) > 3


def test_every_registered_command_is_covered() -> None:
    parser = build_parser()
    top = next(a for a in parser._actions if a.dest == "command")
    assert set(top.choices) == {c[0] for c in COMMANDS if c}


def test_user_error_is_one_line_without_traceback(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "vault", "inspect", str(tmp_path / "missing"),
                           "--key-file", str(tmp_path / "nokey")], capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genofed: error: ") and "Traceback" not in proc.stderr
