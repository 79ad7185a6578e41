"""Helpers for driving Flower's ``flwr`` CLI: run-config strings, app checks, its JSON output."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import GenofedError


class FlowerAppError(GenofedError):
    """A folder is not a Flower app the ``flwr`` CLI can run as is."""


def format_config(config: Mapping[str, Any] | str | None) -> str:
    """``{"vault": "/a b", "rounds": 2, "dp": True}`` -> ``vault='/a b' rounds=2 dp=true``.

    The syntax is what ``--node-config`` and ``--run-config`` parse (space-separated ``key=value``
    with TOML values). Strings become TOML literal strings (``'...'``, no escapes, so Windows
    paths survive) or, if they contain a single quote, basic strings; a string with both quote
    kinds, or a newline, cannot be expressed and raises ``ValueError``. A str is passed through.
    """
    if config is None:
        return ""
    if isinstance(config, str):
        return config.strip()
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(key)):
            raise ValueError(f"config key {key!r}: use letters, digits, '-', '_' and '.' only")
        parts.append(f"{key}={_toml_value(value)}")
    return " ".join(parts)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"config value {value!r} is not finite")
        return repr(value)
    if isinstance(value, (str, Path)):
        return toml_str(str(value))
    raise ValueError(f"config value {value!r}: only bool, int, float and str are supported")


def toml_str(text: str) -> str:
    if "\n" in text or "\r" in text:
        raise ValueError(f"config string {text!r} contains a line break")
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return json.dumps(text)  # JSON string escapes are valid TOML basic-string escapes
    raise ValueError(f"config string {text!r} contains both quote characters")


def check_app(app_dir: Path) -> None:
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise FlowerAppError(f"{app_dir}: no pyproject.toml; not a Flower app folder")
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise FlowerAppError(f"{pyproject}: invalid TOML ({exc})") from None
    if "federations" in data.get("tool", {}).get("flwr", {}):
        raise FlowerAppError(f"{pyproject}: remove [tool.flwr.federations]; `flwr run` would rewrite the "
                              "file (connections live in FLWR_HOME/config.toml)")


def tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def last_json(stdout: str) -> dict[str, Any] | None:
    """The last line of ``stdout`` that parses as a JSON object (flwr prints one with --format json)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
    with contextlib.suppress(json.JSONDecodeError):
        value = json.loads(stdout)
        return value if isinstance(value, dict) else None
    return None


def cli_failure(out: subprocess.CompletedProcess[str], data: dict[str, Any] | None) -> str:
    if data and data.get("error-message"):
        return f"rc={out.returncode}: {data['error-message']}"
    return f"rc={out.returncode}:\n{tail(out.stdout + out.stderr, 20)}"
