"""Benchmarks: each module is runnable with ``python -m simulations.benchmarks.<name> --help``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import GenofedError, error_text


class BenchmarkInputError(GenofedError):
    """A benchmark was pointed at something it cannot read (a missing layout, a layout without sites)."""


def layout_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Deep-model layout fields read from JSON, as ``deep_config(data, **fields)`` takes them (lists as tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def emit(result: dict[str, Any], json_path: str | Path | None) -> None:
    """Print a benchmark's result as JSON, and also write it to ``json_path`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text, encoding="utf-8")


def layout_sites(sites_dir: Path) -> list[Path]:
    """The site folders of a layout (``genofed cohort split|recipe ... --vaults``), or one clear error."""
    from client.site import site_dirs

    if not Path(sites_dir).is_dir():
        raise BenchmarkInputError(f"{sites_dir}: not a folder; make a layout with `genofed cohort split --vaults` "
                                  "or `genofed cohort recipe ... --vaults`")
    sites = site_dirs(Path(sites_dir))
    if not sites:
        raise BenchmarkInputError(f"{sites_dir}: no site folder with vault/ and key; give the folder that "
                                  "`genofed cohort split --vaults` wrote")
    return sites


def layout_cohorts(sites_dir: Path) -> list[Any]:
    """Every site's cohort of a layout, read from its vault with its key file, in site order."""
    from client.cohort_store import load_cohort
    from client.vault import KeySource, Vault

    return [load_cohort(Vault.open(d / "vault", KeySource.from_key_file(d / "key"))) for d in layout_sites(sites_dir)]


def run_main(main: Callable[[], object], prog: str) -> None:
    """Run a benchmark's ``main`` as a command: a genofed error is printed as ``genofed`` prints it
    (:func:`common.errors.error_text`) with its exit code, not a traceback."""
    try:
        main()
    except GenofedError as exc:
        print(f"{prog}: error: {error_text(exc)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
