"""Per-site cohort folders: the layout that ``cohort split`` and ``cohort recipe`` write.

::

    OUT/sites.json          site names, patients and class counts per site, how it was made, seed
    OUT/<site>/spec.toml    the site's cohort spec: every feature list and category pinned, so all
                            sites have the same schema hash (checked before anything is published)
    OUT/<site>/...          the site's files, in the same standard formats as the source
    OUT/<site>/vault/       with --vaults: the site's files imported into an encrypted vault
    OUT/<site>/key          with --vaults: that vault's fresh 32-byte key (mode 0600)

Everything is assembled in a hidden sibling folder and renamed into place at the end, so an
error (a site with one class, a file that fails import) leaves no half-written ``OUT``.

This module also holds the file-level helpers (subset a CSV/TSV, FASTA or VCF to some patients,
deterministic gzip) and :func:`split_cohort`, the engine of ``genofed cohort split``.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import GenofedError
from common.progress import progress_bar
from common.spec import CohortSpec, diff_schemas, load_spec, schema_hash, with_resolved_features, write_spec
from simulations import partition
from simulations.synthetic import prepare_out_dir, publish_dir, write_gzip_text

SITES_JSON = "sites.json"
LAYOUT_VERSION = 1


class LayoutError(GenofedError, ValueError):
    """Per-site folders cannot be made as asked (bad source files, bad options, schema mismatch)."""


# ---------------------------------------------------------------------------------------------
# Small helpers


def slugify(value: object) -> str:
    """A folder-safe name: lower case, runs of other characters turned into ``-``."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(value).strip().lower()).strip("-")
    return slug or "group"


def unique_slugs(values: Iterable[object]) -> list[str]:
    """Slugs of ``values``, made unique by ``-2``, ``-3`` suffixes in order of appearance."""
    seen: dict[str, int] = {}
    out = []
    for v in values:
        base = slugify(v)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def table_delimiter(path: Path) -> str:
    """Tab for ``.tsv`` / ``.tab`` (also gzipped), comma otherwise: the importers' rule."""
    name = path.name.lower().removesuffix(".gz")
    return "\t" if name.endswith((".tsv", ".tab")) else ","


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def read_table(path: Path, delimiter: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV/TSV file as strings, exactly as written (no type guessing)."""
    delimiter = delimiter or table_delimiter(path)
    try:
        with _open_text(path) as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            rows = list(reader)
    except FileNotFoundError:
        raise LayoutError(f"{path}: file not found (named in the cohort spec)") from None
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        raise LayoutError(f"{path}: cannot read as a {'TSV' if delimiter == chr(9) else 'CSV'} "
                          f"table: {exc}") from None
    if not rows:
        raise LayoutError(f"{path}: file is empty (no header line)")
    header = [h.strip() for h in rows[0]]
    return header, [r for r in rows[1:] if any(cell.strip() for cell in r)]


def write_table(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]], *,
                delimiter: str | None = None) -> None:
    """Write a CSV/TSV table (delimiter from the file name unless given), ``\\n`` line ends."""
    delimiter = delimiter or table_delimiter(path)
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    text = buf.getvalue()
    if path.name.lower().endswith(".gz"):
        write_gzip_text(path, text)
    else:
        path.write_text(text, encoding="utf-8", newline="")


def subset_table(src: Path, dst: Path, id_column: str, keep: set[str], *, delimiter: str | None = None) -> int:
    """Copy the rows of ``src`` whose ``id_column`` is in ``keep`` to ``dst``; returns rows written."""
    delimiter = delimiter or table_delimiter(src)
    header, rows = read_table(src, delimiter)
    if id_column not in header:
        raise LayoutError(f"{src}: has no column {id_column!r} (the id column named in the spec); "
                          f"columns are: {', '.join(header[:12])}")
    col = header.index(id_column)
    kept = [r for r in rows if len(r) > col and r[col].strip() in keep]
    write_table(dst, header, kept, delimiter=delimiter)
    return len(kept)


def table_column(path: Path, id_column: str, column: str, delimiter: str | None = None) -> dict[str, str] | None:
    """``id -> value`` of ``column`` in a table, or None if the table has no such column."""
    header, rows = read_table(path, delimiter)
    if column not in header or id_column not in header:
        return None
    i, j = header.index(id_column), header.index(column)
    return {r[i].strip(): (r[j].strip() if len(r) > j else "") for r in rows if len(r) > i}


def subset_fasta(src: Path, dst: Path, keep: set[str]) -> int:
    """Copy the FASTA records of ``src`` whose id (first word of the header) is in ``keep``."""
    out: list[str] = []
    take = False
    n = 0
    with _open_text(src) as fh:
        for line in fh:
            if line.startswith(">"):
                rid = line[1:].split(maxsplit=1)[0] if line[1:].strip() else ""
                take = rid in keep
                n += take
            if take:
                out.append(line if line.endswith("\n") else line + "\n")
    text = "".join(out)
    if dst.name.lower().endswith(".gz"):
        write_gzip_text(dst, text)
    else:
        dst.write_text(text, encoding="utf-8", newline="")
    return n


def subset_vcf_text(lines: Iterable[str], keep: set[str] | Sequence[str]) -> tuple[str, int]:
    """A VCF text with only the samples in ``keep`` (source order); header lines kept unchanged."""
    keep = set(keep)
    out = io.StringIO()
    cols: list[int] | None = None
    n_samples = 0
    for line in lines:
        line = line.rstrip("\r\n")
        if line.startswith("##"):
            out.write(line + "\n")
            continue
        fields = line.split("\t")
        if line.startswith("#CHROM"):
            cols = list(range(min(9, len(fields)))) + [i for i in range(9, len(fields)) if fields[i] in keep]
            n_samples = len(cols) - 9
        elif cols is None:
            raise LayoutError("VCF record before the #CHROM header line")
        elif not line:
            continue
        out.write("\t".join(fields[i] for i in cols) + "\n")
    if cols is None:
        raise LayoutError("VCF has no #CHROM header line")
    return out.getvalue(), n_samples


def subset_vcf(src: Path, dst: Path, keep: set[str] | Sequence[str]) -> int:
    """Copy ``src`` (VCF or VCF.gz) to ``dst`` keeping only the samples in ``keep``; returns samples kept."""
    try:
        with _open_text(src) as fh:
            text, n = subset_vcf_text(fh, keep)
    except LayoutError as exc:
        raise LayoutError(f"{src}: {exc}") from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise LayoutError(f"{src}: cannot read VCF: {exc}") from None
    if dst.name.lower().endswith(".gz"):
        write_gzip_text(dst, text)
    else:
        dst.write_text(text, encoding="utf-8", newline="")
    return n


# ---------------------------------------------------------------------------------------------
# Writing a set of sites


@dataclass
class SitePlan:
    """One site to write: ``write(folder)`` writes its files and returns its spec (paths in ``folder``)."""

    name: str
    write: Callable[[Path], CohortSpec]
    patients: int
    classes: dict[str, int]
    extra: dict[str, Any] = field(default_factory=dict)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_sites(out: Path, plans: Sequence[SitePlan], *, meta: dict[str, Any], vaults: bool,
                expected_hash: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Write every site of ``plans`` under ``out`` (created whole or not at all), plus ``sites.json``.

    Checks before publishing: every site holds at least two classes, all per-site specs have one
    schema hash (equal to ``expected_hash`` when given), and with ``vaults`` every site imports
    and its vault holds exactly the planned patients and classes.
    """
    out = Path(out)
    for plan in plans:
        present = [c for c, k in plan.classes.items() if k > 0]
        if len(present) < 2:
            raise LayoutError(f"{plan.name}: would hold a single class ({', '.join(present) or 'none'}, "
                              f"{plan.patients} patients); every site needs at least two classes")
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise LayoutError(f"site names are not unique: {names}")
    try:
        tmp = prepare_out_dir(out)
    except GenofedError as exc:
        raise LayoutError(str(exc)) from None
    try:
        specs: dict[str, CohortSpec] = {}
        with progress_bar() as bar:
            task = bar.add_task("writing sites", total=len(plans), visible=show_progress)
            for plan in plans:
                bar.update(task, description=f"writing {plan.name}")
                folder = tmp / plan.name
                folder.mkdir()
                spec = plan.write(folder)
                write_spec(spec, folder / "spec.toml")
                specs[plan.name] = load_spec(folder / "spec.toml")
                bar.advance(task)
        hashes = {name: spec.schema_hash() for name, spec in specs.items()}
        reference = expected_hash or hashes[names[0]]
        for name, h in hashes.items():
            if h != reference:
                other = names[0] if expected_hash is None else "source"
                ref_schema = specs[names[0]].schema() if expected_hash is None else None
                detail = "; ".join(diff_schemas(ref_schema, specs[name].schema(), names=(other, name))) \
                    if ref_schema is not None else "differs from the source cohort's resolved schema"
                raise LayoutError(f"{name}: schema hash {h[:12]} differs from {other} ({reference[:12]}): {detail}")
        site_rows = []
        for plan in plans:
            row = {"name": plan.name, "folder": plan.name, "patients": plan.patients, "classes": plan.classes,
                   "classes_present": [c for c, k in plan.classes.items() if k > 0], "spec": f"{plan.name}/spec.toml"}
            row.update(plan.extra)
            site_rows.append(row)
        if vaults:
            summaries = import_vaults(tmp, [p.name for p in plans], show_progress=show_progress, shown_as=out)
            for row, plan in zip(site_rows, plans):
                s = summaries[plan.name]
                if s["patients"] != plan.patients or {c: s["classes"].get(c, 0) for c in plan.classes} != plan.classes:
                    raise LayoutError(f"{plan.name}: the vault holds {s['patients']} patients {s['classes']}, "
                                      f"but {plan.patients} {plan.classes} were written")
                if s["schema_hash"] != reference:
                    raise LayoutError(f"{plan.name}: the imported cohort's schema hash {s['schema_hash'][:12]} "
                                      f"differs from the spec's {reference[:12]}")
                row.update({"vault": f"{plan.name}/vault", "key": f"{plan.name}/key"})
        payload = {
            "layout_version": LAYOUT_VERSION,
            **meta,
            "schema_hash": reference,
            "n_sites": len(plans),
            "patients": int(sum(p.patients for p in plans)),
            "classes": _sum_classes(p.classes for p in plans),
            "sites": site_rows,
            "vaults": bool(vaults),
        }
        (tmp / SITES_JSON).write_text(_dumps(payload), encoding="utf-8")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return payload


def _sum_classes(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for c, k in part.items():
            total[c] = total.get(c, 0) + int(k)
    return total


def import_site_vault(folder: Path) -> dict[str, Any]:
    """Import ``folder/spec.toml`` into ``folder/vault`` under a fresh key ``folder/key``.

    Returns the cohort's counts-only summary (:meth:`common.cohort.Cohort.summary`).
    """
    from client.cohort_store import save_cohort
    from client.importers import import_cohort
    from client.vault import KeySource, generate_key_file

    spec = load_spec(folder / "spec.toml")
    cohort = import_cohort(spec)
    key = KeySource.from_key_file(generate_key_file(folder / "key"))
    save_cohort(folder / "vault", cohort, key)
    return cohort.summary()


def _first_problem(exc: GenofedError, root: Path, shown_as: Path | None) -> str:
    """One line for a failed import: its first problem (and how many more), paths as the user will see them."""
    problems = getattr(exc, "problems", None)
    if problems:
        text = str(problems[0])
        more = int(getattr(exc, "total", len(problems))) - 1
        text += f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""
    else:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.replace(str(root), str(shown_as)) if shown_as is not None else text


def import_vaults(root: Path, names: Sequence[str], *, show_progress: bool = True,
                  shown_as: Path | None = None) -> dict[str, dict[str, Any]]:
    """Import every site folder ``root/<name>`` into its own vault, with a progress bar.

    ``shown_as``: the path ``root`` will have once published, used in error messages.
    """
    summaries: dict[str, dict[str, Any]] = {}
    with progress_bar() as bar:
        task = bar.add_task("importing sites into vaults", total=len(names), visible=show_progress)
        for name in names:
            bar.update(task, description=f"importing {name}")
            try:
                summaries[name] = import_site_vault(root / name)
            except GenofedError as exc:
                raise LayoutError(f"{name}: import into a vault failed: {_first_problem(exc, root, shown_as)}") from exc
            bar.advance(task)
    return summaries


def summary_lines(payload: dict[str, Any], out: Path) -> list[str]:
    """A short human summary of a written layout: one line per site, then where things are."""
    lines = [f"{payload['n_sites']} sites, {payload['patients']} patients, schema {payload['schema_hash'][:12]}"]
    width = max(len(s["name"]) for s in payload["sites"])
    for s in payload["sites"]:
        classes = ", ".join(f"{c} {k}" for c, k in s["classes"].items())
        vault = f"  vault: {out / s['vault']}" if s.get("vault") else ""
        lines.append(f"  {s['name']:<{width}}  {s['patients']:>6} patients  ({classes}){vault}")
    lines.append(f"sites.json: {out / SITES_JSON}")
    lines.append(f"site specs: {out}/<site>/spec.toml")
    return lines


# ---------------------------------------------------------------------------------------------
# cohort split


@dataclass
class _Source:
    spec: CohortSpec
    schema: dict[str, Any]
    ids: np.ndarray
    labels: np.ndarray          # class names


def _load_source(spec_path: Path) -> _Source:
    from client.importers import import_cohort

    spec = load_spec(spec_path)
    cohort = import_cohort(spec)
    classes = np.asarray(cohort.classes, dtype=object)
    return _Source(spec=spec, schema=cohort.schema, ids=np.asarray(cohort.patient_ids).astype(str),
                   labels=classes[np.asarray(cohort.labels, dtype=np.int64)])


def _resolved_spec(src: _Source) -> CohortSpec:
    """The source spec with every feature list pinned to what the import resolved."""
    spec, schema = src.spec, src.schema
    pins: dict[str, tuple[str, ...]] = {}
    if spec.variants is not None and spec.variants.sites is None:
        pins["variants"] = tuple(schema["variants"]["sites"])
    if spec.omics is not None and spec.omics.features is None:
        pins["omics"] = tuple(schema["omics"]["features"])
    if spec.events is not None and spec.events.features is None:
        pins["events"] = tuple(schema["events"]["features"])
    return with_resolved_features(spec, **pins) if pins else spec


def _spec_files(spec: CohortSpec) -> list[tuple[str, Path, str | None, str | None]]:
    """``(kind, path, id column, delimiter)`` of every file the spec names; kind: table, fasta or vcf.

    The delimiter is None where the importers take it from the file name (every table but a
    sequence table, whose ``format`` says it).
    """
    files: list[tuple[str, Path, str | None, str | None]] = [
        ("table", spec.label.file, spec.label.id_column or spec.id_column, None)]
    if (s := spec.sequences) is not None:
        files.append(("fasta", s.file, None, None) if s.format == "fasta" else
                     ("table", s.file, spec.id_column_for(s), "\t" if s.format == "tsv" else ","))
    if (v := spec.variants) is not None:
        files.append(("vcf", v.file, None, None))
    for part in (spec.omics, spec.clinical, spec.events):
        if part is not None:
            files.append(("table", part.file, spec.id_column_for(part), None))
    if spec.events is not None and spec.events.profiled is not None:
        files.append(("table", spec.events.profiled, spec.id_column_for(spec.events), None))
    if spec.split.group_file is not None:
        files.append(("table", spec.split.group_file, spec.id_column, None))
    return files


def _file_names(paths: Iterable[Path]) -> dict[Path, str]:
    names: dict[Path, str] = {}
    used: set[str] = set()
    for p in paths:
        p = Path(p).resolve()
        if p in names:
            continue
        name = p.name
        k = 2
        while name in used:
            name = f"{k}-{p.name}"
            k += 1
        used.add(name)
        names[p] = name
    return names


def _relocate(spec: CohortSpec, folder: Path, names: dict[Path, str]) -> CohortSpec:
    """``spec`` with every file path moved into ``folder`` (same base names)."""

    def move(p: Path) -> Path:
        return folder / names[Path(p).resolve()]

    def move_optional(p: Path | None) -> Path | None:
        return None if p is None else move(p)

    changes: dict[str, Any] = {"label": dataclasses.replace(spec.label, file=move(spec.label.file)),
                               "split": dataclasses.replace(spec.split, group_file=move_optional(spec.split.group_file)),
                               "source": None}
    for name in ("sequences", "variants", "omics", "clinical"):
        part = getattr(spec, name)
        if part is not None:
            changes[name] = dataclasses.replace(part, file=move(part.file))
    if spec.events is not None:
        changes["events"] = dataclasses.replace(spec.events, file=move(spec.events.file),
                                                profiled=move_optional(spec.events.profiled))
    return dataclasses.replace(spec, **changes)


def _group_values(spec: CohortSpec, column: str, ids: np.ndarray) -> np.ndarray:
    """Values of ``column`` for ``ids``, from the first table of the spec that has it."""
    tried = []
    for kind, path, id_col, delimiter in _spec_files(spec):
        if kind != "table" or path in tried:
            continue
        tried.append(path)
        values = table_column(Path(path), id_col or spec.id_column, column, delimiter)
        if values is not None:
            missing = [i for i in ids if i not in values]
            if missing:
                raise LayoutError(f"{path}: {len(missing)} patients have no row (first: {missing[0]}), "
                                  f"so column {column!r} cannot place them")
            return np.asarray([values[i] for i in ids], dtype=object)
    raise LayoutError(f"--column {column!r}: no table of the cohort has that column "
                      f"(looked in {', '.join(Path(p).name for p in tried)})")


def split_cohort(*, spec_path: str | Path, sites: int | None, by: str, out: str | Path, alpha: float | None = None,
                 column: str | None = None, seed: int = 0, vaults: bool = False,
                 min_size: int = partition.MIN_SITE_SIZE, show_progress: bool = True) -> dict[str, Any]:
    """Split one cohort over sites: per-site folders of standard files, ``sites.json``, optional vaults.

    The source is imported first (every file validated; feature lists resolved), then each site
    gets the rows of every file that belong to its patients, and a spec with the resolved feature
    lists pinned, so that every site's schema hash equals the source's resolved schema hash.
    Returns the ``sites.json`` payload.
    """
    spec_path, out = Path(spec_path), Path(out)
    if by not in partition.METHODS:
        raise LayoutError(f"--by must be one of {', '.join(partition.METHODS)}, got {by!r}")
    if by == "column" and not column:
        raise LayoutError("--by column needs --column NAME (the table column that names each patient's site)")
    if by != "column" and sites is None:
        raise LayoutError(f"--by {by} needs --sites N")
    if by in ("dirichlet", "quantity") and alpha is None:
        alpha = 0.5 if by == "dirichlet" else 1.0
    src = _load_source(spec_path)
    resolved = _resolved_spec(src)
    expected = schema_hash(src.schema)
    if resolved.schema_hash() != expected:
        detail = "; ".join(diff_schemas(src.schema, resolved.schema(), names=("import", "spec")))
        raise LayoutError(f"{spec_path}: the pinned spec does not reproduce the imported schema: {detail}")

    labels = src.labels
    values: list[str] = []
    if by == "column":
        assert column is not None
        groups = _group_values(resolved, column, src.ids)
        assign, values = partition.column(labels, groups, min_size=min_size)
        if sites is not None and sites != len(values):
            raise LayoutError(f"--sites {sites} but column {column!r} has {len(values)} distinct values "
                              f"({', '.join(values[:8])}); leave --sites out with --by column")
        names = unique_slugs(values)
    else:
        n_req = int(sites) if sites is not None else 0
        conc = float(alpha) if alpha is not None else 1.0
        if by == "iid":
            assign = partition.iid(labels, n_req, seed=seed, min_size=min_size)
        elif by == "dirichlet":
            assign = partition.dirichlet(labels, n_req, alpha=conc, seed=seed, min_size=min_size)
        else:
            assign = partition.quantity(labels, n_req, alpha=conc, seed=seed, min_size=min_size)
        names = [f"site-{k + 1}" for k in range(n_req)]
    n_sites = len(names)
    classes = list(resolved.label.classes)
    counts = partition.class_counts(labels, assign, n_sites)
    files = _spec_files(resolved)
    file_names = _file_names(p for _, p, _, _ in files)

    def writer(k: int) -> Callable[[Path], CohortSpec]:
        keep = set(src.ids[assign == k].tolist())

        def write(folder: Path) -> CohortSpec:
            done: set[Path] = set()
            for kind, path, id_col, delimiter in files:
                path = Path(path).resolve()
                if path in done:
                    continue
                done.add(path)
                dst = folder / file_names[path]
                if kind == "fasta":
                    subset_fasta(path, dst, keep)
                elif kind == "vcf":
                    subset_vcf(path, dst, keep)
                else:
                    subset_table(path, dst, id_col or resolved.id_column, keep, delimiter=delimiter)
            site_spec = _relocate(resolved, folder, file_names)
            return dataclasses.replace(site_spec, name=f"{resolved.name}-{names[k]}")
        return write

    plans = [SitePlan(name=names[k], write=writer(k), patients=int((assign == k).sum()),
                      classes={c: counts[k].get(c, 0) for c in classes},
                      extra={"group_value": values[k]} if by == "column" else {})
             for k in range(n_sites)]
    meta = {
        "made_by": "genofed cohort split",
        "source": {"spec": str(spec_path.resolve()), "name": resolved.name, "patients": int(labels.size),
                   "classes": {c: int((labels == c).sum()) for c in classes}},
        "split": {"by": by, "sites": n_sites, "alpha": alpha, "column": column, "seed": seed,
                  "min_site_size": min_size,
                  "label_skew_tv": round(partition.label_skew(labels, assign, n_sites), 6)},
        "seed": seed,
    }
    return write_sites(out, plans, meta=meta, vaults=vaults, expected_hash=expected, show_progress=show_progress)


def set_layout_policy(sites_dir: str | Path, *, allow_raise: bool = False, **changes: Any) -> None:
    """Set the same privacy-policy ``changes`` at every site of a layout, as each site's officer would.

    For simulations and tests, where one researcher stands in for every hospital; a real site
    sets its own with ``genofed ledger policy``. Keys are :class:`client.privacy.policy.SitePolicy`
    fields (``require_dp``, ``budget_epsilon``, ``delta``, ``max_run_epsilon``,
    ``test_statistics``, ``test_epsilon``).
    """
    from client.cohort_store import load_cohort
    from client.privacy.facade import set_policy
    from client.site import site_dirs
    from client.vault import KeySource, Vault

    for site in site_dirs(Path(sites_dir)):
        vault = Vault.open(site / "vault", KeySource.from_key_file(site / "key"))
        set_policy(vault, site=site.name, n_records=load_cohort(vault).n, allow_raise=allow_raise, **changes)
