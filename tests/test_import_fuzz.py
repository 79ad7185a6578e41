"""Mutated input files through the real ``genofed vault import``: success or the documented error, nothing else.

Hypothesis mutates one file of a small valid cohort at a time (clinical CSV, omics CSV, events
TSV, FASTA, VCF as text and as gzip bytes, the spec TOML): bytes deleted, inserted or truncated,
lines dropped or doubled, cells replaced by awkward tokens. Every case must end either in a vault
that opens and verifies, or in exit status 1 with ``genofed: error: ...`` as the first line of
stderr (the problems follow one per line). Never a traceback, never a vault or a hidden
``.partial-`` folder left by a refused import, never a file written outside the target.
``GENOFED_FUZZ_EXAMPLES`` sets the cases per file (default 25, a fixed sequence);
``GENOFED_FUZZ_EXPLORE=1`` draws new cases on every run. The count that ran is printed.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.vault import KeySource, Vault, generate_key_file
from simulations.cli import main
from simulations.synthetic import write_synthetic_cohort

EXAMPLES = int(os.environ.get("GENOFED_FUZZ_EXAMPLES", "25"))
EXPLORE = os.environ.get("GENOFED_FUZZ_EXPLORE") == "1"
"""New random cases on every run (to look for new failures), instead of CI's fixed sequence."""
FILES = ["clinical.csv", "omics.csv", "mutations.tsv", "sequences.fa", "variants.vcf", "variants.vcf.gz", "spec.toml"]
TOKENS = ["", "NA", "nan", "inf", "-inf", "1e999", "-1", "0/2", "./.", "1|", "2/2/2", "ACGTN", "acgt", ">", "\x00",
          "é", "x" * 300, ",", "\t", "\n", '"', "'", "P00001", "[", "]", "=", "==", "true", "999999999999999999999"]
RAN: Counter[str] = Counter()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small valid cohort; also a plain-text copy of its VCF so that text mutations reach records."""
    root = tmp_path_factory.mktemp("fuzz-base")
    write_synthetic_cohort(out=root / "cohort", patients=60, seed=9)
    cohort = root / "cohort"
    (cohort / "variants.vcf").write_bytes(gzip.decompress((cohort / "variants.vcf.gz").read_bytes()))
    yield cohort
    print(f"\nfuzzed cases run: {dict(RAN)} ({sum(RAN.values())} in all)")


def _sep(name: str) -> bytes:
    return b"," if name.endswith(".csv") else b"\t"


@st.composite
def mutations(draw: st.DrawFn) -> list[tuple]:
    token = st.one_of(st.sampled_from(TOKENS).map(str.encode), st.binary(min_size=1, max_size=12))
    op = st.one_of(
        st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 40)),
        st.tuples(st.just("insert"), st.floats(0, 1), token),
        st.tuples(st.just("truncate"), st.floats(0, 1)),
        st.tuples(st.just("drop-line"), st.floats(0, 1)),
        st.tuples(st.just("double-line"), st.floats(0, 1)),
        st.tuples(st.just("cell"), st.floats(0, 1), st.integers(0, 60), token),
    )
    return draw(st.lists(op, min_size=1, max_size=3))


def _mutate(data: bytes, ops: list[tuple], sep: bytes) -> bytes:
    for op, where, *rest in ops:
        at = int(where * len(data))
        if op == "delete":
            data = data[:at] + data[at + rest[0]:]
        elif op == "insert":
            data = data[:at] + rest[0] + data[at:]
        elif op == "truncate":
            data = data[:at]
        else:
            lines = data.split(b"\n")
            i = min(int(where * len(lines)), len(lines) - 1)
            if op == "drop-line":
                del lines[i]
            elif op == "double-line":
                lines.insert(i, lines[i])
            else:
                cells = lines[i].split(sep)
                cells[rest[0] % len(cells)] = rest[1]
                lines[i] = sep.join(cells)
            data = b"\n".join(lines)
    return data


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_a_mutated_file_is_imported_or_refused_with_the_documented_error(base: Path, name: str,
                                                                         tmp_path_factory: pytest.TempPathFactory
                                                                         ) -> None:
    work = tmp_path_factory.mktemp(f"fuzz-{name}")
    key_path = generate_key_file(work / "key")
    case = iter(range(10**9))

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not EXPLORE, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(ops=mutations())
    def one_case(ops: list[tuple]) -> None:
        root = work / f"case-{next(case)}"
        shutil.copytree(base, root / "cohort")
        if name == "variants.vcf":  # import the plain-text copy
            spec = root / "cohort" / "spec.toml"
            spec.write_text(spec.read_text().replace('file = "variants.vcf.gz"', 'file = "variants.vcf"'))
        target = root / "cohort" / name
        target.write_bytes(_mutate(target.read_bytes(), ops, _sep(name)))
        before = _files(root)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["vault", "import", "--spec", str(root / "cohort" / "spec.toml"), "--out", str(root / "vault"),
                         "--key-file", str(key_path)])
        RAN[name] += 1
        after = _files(root)
        if code == 0:
            Vault.open(root / "vault", KeySource.from_key_file(key_path)).verify()
            assert {f for f in after - before if not f.startswith("vault")} == set(), after - before
        else:
            text = err.getvalue()
            assert code == 1 and text.startswith("genofed: error: ") and "Traceback" not in text, text
            assert after == before, f"a refused import left {sorted(after - before)}"
        shutil.rmtree(root)

    one_case()


@pytest.mark.slow
def test_a_mutated_vault_file_is_read_or_refused_with_the_documented_error(base: Path, tmp_path: Path) -> None:
    """The vault reader on a mutated manifest, index or blob: ``vault verify`` and ``vault inspect``
    succeed (a change that leaves the vault valid) or end in one documented error."""
    key_path = generate_key_file(tmp_path / "key")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["vault", "import", "--spec", str(base / "spec.toml"), "--out", str(tmp_path / "vault"),
                     "--key-file", str(key_path)]) == 0
    files = sorted(p.name for p in (tmp_path / "vault").iterdir() if p.is_file() and not p.name.startswith("."))
    case = iter(range(10**9))

    @settings(max_examples=EXAMPLES * 4, deadline=None, derandomize=not EXPLORE, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(which=st.sampled_from(files), ops=mutations())
    def one_case(which: str, ops: list[tuple]) -> None:
        vault = tmp_path / f"case-{next(case)}"
        shutil.copytree(tmp_path / "vault", vault)
        (vault / which).write_bytes(_mutate((vault / which).read_bytes(), ops, b","))
        for command in ("verify", "inspect"):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(["vault", command, str(vault), "--key-file", str(key_path)])
            RAN[f"vault {command}"] += 1
            text = err.getvalue()
            assert code == 0 or (code == 1 and text.startswith("genofed: error: ") and "Traceback" not in text), text
        shutil.rmtree(vault)

    one_case()
