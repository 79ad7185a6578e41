"""Benchmark: importing a VCF into an encrypted vault against a bare parse with cyvcf2 alone.

Both run in the same process on the same file, alternating, so the ratio is fair on a busy
machine. The bare parse decodes every record's genotypes (``gt_types``), which is the least any
importer must do (a plain iteration without decoding is timed too, as a floor); the import adds validation, the dosage matrix, serialisation, AES-256-GCM
encryption and the atomic, fsynced vault write.

Usage::

    python -m simulations.benchmarks.import_vcf --data ../shared/data [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from simulations.benchmarks import emit, run_main


def bare_parse(vcf: Path, *, decode: bool = True) -> int:
    """Iterate every record, with genotypes decoded (``gt_types``) or not; returns the record count."""
    from cyvcf2 import VCF

    n = 0
    reader = VCF(str(vcf))
    try:
        for record in reader:
            if decode:
                _ = record.gt_types
            n += 1
    finally:
        reader.close()
    return n


def write_kg1000_spec(data: Path, work: Path) -> Path:
    """A spec for the whole 1000 Genomes slice: label = super-population."""
    import pandas as pd

    from cyvcf2 import VCF

    panel = pd.read_csv(data / "kg1000_chr1" / "integrated_call_samples_v3.20130502.ALL.panel", sep="\t",
                        dtype=str, keep_default_na=False)
    vcf = (data / "kg1000_chr1" / "example.vcf.gz").resolve()
    # The panel lists 31 people the VCF slice does not carry; the label file is the cohort.
    in_vcf = set(VCF(str(vcf)).samples)
    labels = panel.loc[panel["sample"].isin(in_vcf), ["sample", "super_pop"]]
    labels.to_csv(work / "labels.csv", index=False)
    classes = sorted(labels["super_pop"].unique())
    spec = work / "spec.toml"
    spec.write_text(f"""[cohort]
name = "kg1000-benchmark"
id-column = "sample"
[label]
file = "labels.csv"
column = "super_pop"
classes = {json.dumps(classes)}
[modalities.variants]
file = "{vcf}"
""")
    return spec


def import_to_vault(spec_path: Path, vault: Path, key_file: Path) -> int:
    """Full import: parse + validate + encrypt + atomic write. Returns the variant count."""
    from client.cohort_store import save_cohort
    from client.importers import import_cohort
    from client.vault import KeySource
    from common.spec import load_spec

    cohort = import_cohort(load_spec(spec_path))
    save_cohort(vault, cohort, KeySource.from_key_file(key_file), overwrite=vault.exists())
    return len(cohort.variants.features)


def run(data: Path, repeats: int) -> dict[str, Any]:
    """Time both paths ``repeats`` times, alternating; returns medians and the ratio."""
    from client.vault import generate_key_file

    vcf = data / "kg1000_chr1" / "example.vcf.gz"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = write_kg1000_spec(data, work)
        key = generate_key_file(work / "key")
        bare, full, iterate, records = [], [], [], 0
        import_to_vault(spec, work / "vault", key)  # warm-up: imports, page cache
        for _ in range(repeats):
            t0 = time.perf_counter()
            bare_parse(vcf, decode=False)
            iterate.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            records = bare_parse(vcf)
            bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            import_to_vault(spec, work / "vault", key)
            full.append(time.perf_counter() - t0)
    b, f, it = statistics.median(bare), statistics.median(full), statistics.median(iterate)
    return {"file": str(vcf), "records": records, "samples": 2504, "repeats": repeats,
            "bare_iterate_s": round(it, 4), "bare_parse_s": round(b, 4), "import_s": round(f, 4),
            "import_over_iterate": round(f / it, 2),
            "bare_records_per_s": round(records / b), "import_records_per_s": round(records / f),
            "import_over_bare": round(f / b, 2), "bare_all_s": [round(x, 4) for x in bare],
            "import_all_s": [round(x, 4) for x in full]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data folder")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each path (default 5)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = run(args.data, args.repeats)
    emit(result, args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.import_vcf")
