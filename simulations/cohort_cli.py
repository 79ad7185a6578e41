"""``genofed cohort``: make cohorts for research and simulation (``synth``, ``split``, ``recipe``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from simulations import partition, recipes, site_layout, synthetic

_FMT = argparse.RawDescriptionHelpFormatter

GROUP_HELP = """\
Make cohorts for research and simulation.

  genofed cohort synth    a synthetic cohort with planted ground truth (standard files + spec + truth)
  genofed cohort split    one cohort split over N sites (per-site files and specs, optional vaults)
  genofed cohort recipe   the real data sets in ../shared/data as per-site cohorts

Run `genofed cohort COMMAND --help` for the options of each.
"""

SYNTH_HELP = """\
Write a synthetic cohort with planted ground truth into OUT (created; must not exist or be empty):
  sequences.fa      FASTA, one record per patient, length L
  variants.vcf.gz   multi-sample VCF 4.2 (biallelic SNPs, GT), gzip
  omics.csv         wide matrix: patient_id + P features
  clinical.csv      patient_id, outcome (control/case), age, bmi, sex, smoker, site_hint
  mutations.tsv     long format: patient_id, gene
  spec.toml         the cohort spec (all feature lists and categories pinned)
  truth.json        what was planted: motifs and their positions, causal variants, omics and clinical
                    effects, the motif x variant interaction, ancestry groups, site shifts, the label model
The same arguments always give byte-identical files.

example:
  genofed cohort synth --out cohorts/syn --patients 2000 --seed 7
"""

SPLIT_HELP = """\
Split a cohort over N sites. The source is imported first (every file validated, feature lists
resolved); each site folder OUT/<site>/ then gets the rows of every file that belong to its
patients, in the same formats, and a spec.toml with every feature list pinned, so that all sites
share the source's schema hash. OUT/sites.json lists sites, patients, classes per site, how the
split was made and the seed. No site may end up with one class or fewer than 10 patients.

partitions (--by):
  iid        stratified random: equal sizes, the same class mix everywhere
  dirichlet  label skew: each class divided over sites in Dirichlet(--alpha) proportions
             (default alpha 0.5; smaller = more skew; infeasible draws are retried, then refused)
  quantity   size skew: site sizes from Dirichlet(--alpha) (default 1.0), class mix kept
  column     natural groups: one site per value of --column (sites named by the values)

With --vaults each site is also imported into OUT/<site>/vault under a fresh key OUT/<site>/key.

examples:
  genofed cohort split --spec cohorts/syn/spec.toml --sites 4 --by dirichlet --alpha 0.3 --out sites/
  genofed cohort split --spec cohorts/syn/spec.toml --by column --column site_hint --out sites/ --vaults
"""

RECIPE_HELP = """\
Turn a real data set from ../shared/data into per-site cohorts (same layout as `cohort split`).

  splice    UCI splice junctions, 3,190 x 60 bp, classes EI/IE/N. Whole locus groups (gene locus =
            instance name before the first '-', loci sharing an identical sequence joined) are
            dealt to sites, and splits are made by locus group. Repeated instance names get '#2',
            '#3' (counted in sites.json). Default 3 sites.
  kg1000    1000 Genomes chr1 slice, 4,296 variants x 2,504 people, label super_pop (5 classes).
            Whole populations are dealt out so every site sees several super-populations.
            Default 4 sites (every site then holds all five); 2 to 13.
  metabric  METABRIC, one site per contributing centre (Cohort 1-5): --sites must be 5. Label:
            died of the disease (survival event == 1) versus not; clinical fields and mutated-gene
            flags (patients without any mutation record are 'not profiled': missing, not zero).

examples:
  genofed cohort recipe splice --data ../shared/data --out sites/splice
  genofed cohort recipe metabric --data ../shared/data --sites 5 --out sites/metabric --vaults
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cohort`` command group (``synth``, ``split``, ``recipe``) to the console script."""
    group = subparsers.add_parser("cohort", help="make cohorts: synthetic, split over sites, real-data recipes",
                                  description=GROUP_HELP, formatter_class=_FMT)
    group.set_defaults(_group_parser=group)
    sub = group.add_subparsers(dest="cohort_command", metavar="COMMAND")

    p = sub.add_parser("synth", help="a synthetic cohort with planted ground truth", description=SYNTH_HELP,
                       formatter_class=_FMT)
    p.add_argument("--out", required=True, type=Path, help="folder to create (must not exist, or be empty)")
    p.add_argument("--patients", required=True, type=int, help="number of patients (at least 50)")
    p.add_argument("--seed", required=True, type=int, help="random seed; the same seed gives the same files")
    p.add_argument("--sequence-length", type=int, default=200, metavar="L", help="sequence length (default 200)")
    p.add_argument("--variants", type=int, default=200, metavar="M", help="number of SNPs in the VCF (default 200)")
    p.add_argument("--omics", type=int, default=50, metavar="P", help="number of omics features (default 50)")
    p.add_argument("--site-shift", type=float, default=1.0, metavar="S",
                   help="scale of the per-site shifts (age, omics batch offset); 0 turns them off (default 1)")
    p.set_defaults(func=synth_command)

    p = sub.add_parser("split", help="split a cohort over N sites (optionally into vaults)", description=SPLIT_HELP,
                       formatter_class=_FMT)
    p.add_argument("--spec", required=True, type=Path, help="the source cohort's spec.toml")
    p.add_argument("--sites", type=int, default=None, metavar="N",
                   help="number of sites (required unless --by column)")
    p.add_argument("--by", required=True, choices=partition.METHODS, help="how to partition patients over sites")
    p.add_argument("--alpha", type=float, default=None, metavar="A",
                   help="Dirichlet concentration for --by dirichlet (default 0.5) or quantity (default 1.0)")
    p.add_argument("--column", default=None, metavar="C", help="table column naming each patient's site (--by column)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the partition (default 0)")
    p.add_argument("--out", required=True, type=Path, help="folder to create (must not exist, or be empty)")
    p.add_argument("--vaults", action="store_true",
                   help="also import every site into OUT/<site>/vault with a fresh key OUT/<site>/key")
    p.set_defaults(func=split_command)

    p = sub.add_parser("recipe", help="real data sets (splice, kg1000, metabric) as per-site cohorts",
                       description=RECIPE_HELP, formatter_class=_FMT)
    p.add_argument("name", choices=recipes.RECIPES, help="which data set")
    p.add_argument("--data", type=Path, default=Path("../shared/data"),
                   help="the shared data folder holding splice/, kg1000_chr1/, metabric/ (default ../shared/data)")
    p.add_argument("--sites", type=int, default=None, metavar="N",
                   help="number of sites (default: splice 3, kg1000 4, metabric 5)")
    p.add_argument("--out", required=True, type=Path, help="folder to create (must not exist, or be empty)")
    p.add_argument("--vaults", action="store_true",
                   help="also import every site into OUT/<site>/vault with a fresh key OUT/<site>/key")
    p.add_argument("--seed", type=int, default=0, help="seed for dealing groups to sites and for splits (default 0)")
    p.set_defaults(func=recipe_command)


def synth_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed cohort synth``."""
    summary = synthetic.write_synthetic_cohort(out=args.out, patients=args.patients, seed=args.seed,
                                               sequence_length=args.sequence_length, variants=args.variants,
                                               omics=args.omics, site_shift=args.site_shift)
    classes = ", ".join(f"{c} {k}" for c, k in summary["classes"].items())
    print(f"synthetic cohort: {summary['patients']} patients ({classes}), seed {args.seed}")
    print(f"files:  {args.out}/ ({', '.join(summary['files'])})")
    print(f"spec:   {summary['spec']}")
    print(f"truth:  {args.out / 'truth.json'}")
    return 0


def split_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed cohort split``."""
    payload = site_layout.split_cohort(spec_path=args.spec, sites=args.sites, by=args.by, alpha=args.alpha,
                                       column=args.column, seed=args.seed, out=args.out, vaults=args.vaults)
    how = payload["split"]
    extra = f", alpha {how['alpha']:g}" if how.get("alpha") is not None else ""
    extra += f", column {how['column']}" if how.get("column") else ""
    print(f"split by {how['by']}{extra}, seed {how['seed']}")
    for line in site_layout.summary_lines(payload, args.out):
        print(line)
    return 0


def recipe_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed cohort recipe``."""
    payload = recipes.run_recipe(args.name, data=args.data, sites=args.sites, out=args.out, vaults=args.vaults,
                                 seed=args.seed)
    dropped = payload.get("dropped", {}).get("total")
    note = f", {dropped} patients dropped (see sites.json)" if dropped else ""
    print(f"recipe {args.name}, seed {args.seed}{note}")
    for line in site_layout.summary_lines(payload, args.out):
        print(line)
    return 0
