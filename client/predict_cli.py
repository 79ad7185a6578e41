"""``genofed predict``: one patient's predictions from the site's final models, explained, on site.

The command reads the site's vault (``--key-file`` or ``--passphrase-file``, like the vault
commands), decrypts the cohort and the final models in memory and prints, for one patient, every
model's probabilities, the predicted class and what drove it (:mod:`client.predict`). Nothing is
written, nothing is sent, and the privacy ledger is not touched: the patient's record and the
models never leave the machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from client.vault import Vault
from client.vault_cli import key_from_args

_FORMATTER = argparse.RawDescriptionHelpFormatter

PREDICT_DESCRIPTION = """\
Decision support for one patient, on the hospital's own machine: the final models a federated run
left in the site's vault (the global deep model "cnn", the site's "forest", the federated GLM "logreg",
the site's own GLM "site-logreg" and the meta-classifier "hybrid") give their class probabilities and
the class each predicts at the run's operating threshold (binary problems; argmax for several
classes), and the patient's own explanations: the forest's top features (TreeSHAP: contributions plus
the expected value add up to the forest's probability), each GLM's (exact linear attributions,
log-odds) and the deep model's top
sequence positions (integrated gradients). --lime adds LIME as a second opinion on the forest and says
where SHAP and LIME agree. When the vault holds the run's global explanation, the patient is placed
against it: for the run's top features, the patient's value and contribution beside the global mean.

The patient is one of the vault's cohort (--patient ID), or a new one (--input SPEC): a cohort spec in
the cohort's formats whose files hold the new patient(s), imported in memory with the same importer and
refused unless its schema is the vault cohort's (feature lists the spec leaves out are the vault's; the
label column must be filled in, with any class: it is not used).

Privacy: runs on site from the vault; nothing is written, nothing is sent, nothing is charged to the
site's privacy ledger. The output names the patient's own values: show it only to those who may see
the patient's record.

Examples:
  genofed predict --vault /data/vault --key-file /data/vault.key --patient P00017
  genofed predict --vault /data/vault --key-file /data/vault.key --patient P00017 --lime --json
  genofed predict --vault /data/vault --key-file /data/vault.key --input new/spec.toml --patient N001"""

SPLIT_NOTES = {
    "train": "this patient is in the train split: the forest, the GLM and the deep model were fitted on them, so "
             "these probabilities are in-sample (optimistic)",
    "validation": "this patient is in the validation split: the meta-classifier and the operating thresholds were "
                  "fitted with them",
    "test": "this patient is in the test split: held out from every fit",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``predict`` to the console script."""
    from client.predict import LIME_SAMPLES, TOP

    p = subparsers.add_parser("predict", help="one patient's predictions and explanations from the site's final "
                              "models (on site; nothing sent)", description=PREDICT_DESCRIPTION,
                              formatter_class=_FORMATTER)
    p.add_argument("--vault", required=True, type=Path, metavar="VAULT", help="the site's vault folder")
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--key-file", type=Path, metavar="KEY", help="the vault's 32-byte key file")
    key.add_argument("--passphrase-file", type=Path, metavar="FILE",
                     help="a text file whose first line is the vault's passphrase (instead of --key-file)")
    p.add_argument("--patient", metavar="ID", help="the patient's id (as in the label file's id column); "
                   "with --input, optional when the files hold one patient")
    p.add_argument("--input", type=Path, metavar="SPEC_OR_FILES",
                   help="a new patient: a cohort spec (or its folder, holding spec.toml) whose files hold them")
    p.add_argument("--lime", action="store_true", help="also explain the forest with LIME and compare with SHAP")
    p.add_argument("--top", type=int, default=TOP, metavar="K", help=f"features and positions per model ({TOP})")
    p.add_argument("--lime-samples", type=int, default=LIME_SAMPLES, metavar="N",
                   help=f"LIME's perturbed records ({LIME_SAMPLES})")
    p.add_argument("--seed", type=int, default=0, help="LIME's sampling seed (0)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=predict_command)


def predict_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed predict``."""
    doc = run_predict(vault_path=args.vault, key=key_from_args(args), patient=args.patient, input_spec=args.input,
                      lime=args.lime, top=args.top, seed=args.seed, lime_samples=args.lime_samples)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_prediction(doc)
    return 0


def run_predict(*, vault_path: Path, key: Any, patient: str | None, input_spec: Path | None, lime: bool = False,
                top: int = 5, seed: int = 0, lime_samples: int = 1000) -> dict[str, Any]:
    """Open the vault, find the patient, predict and explain; the JSON document ``--json`` prints.

    Raises
    ------
    common.errors.GenofedError
        Wrong key, no final models, an unknown patient, new patients' files with another schema.
    """
    from client.cohort_store import load_cohort
    from client.pipeline import SiteData
    from client.predict import PRIVACY_NOTE, PredictError, import_patients, load_predictor, patient_index, \
        predict_patient
    from common.spec import SPLIT_NAMES

    if patient is None and input_spec is None:
        raise PredictError(f"{vault_path}: name the patient with --patient ID (or give a new patient's files with "
                           "--input SPEC)")
    if top < 1 or lime_samples < 10:
        raise PredictError("--top must be at least 1 and --lime-samples at least 10")
    vault = Vault.open(vault_path, key)
    cohort = load_cohort(vault)
    notes: list[str] = []
    if input_spec is None:  # the patient first, then the (slower) models: a wrong id fails fast
        index = patient_index(cohort, patient, source=vault_path)
        data, pid = None, str(cohort.patient_ids[index])
        split, label = SPLIT_NAMES[int(cohort.split[index])], cohort.classes[int(cohort.labels[index])]
        notes.append(SPLIT_NOTES[split])
    else:
        new = import_patients(input_spec, schema=cohort.schema)
        index = patient_index(new, patient, source=input_spec, new=True)
        data, pid, split, label = SiteData.from_cohort(new), str(new.patient_ids[index]), None, None
        if pid in set(cohort.patient_ids.astype(str)):
            notes.append(f"a patient with id {pid} is also in the vault's cohort; this prediction is for the "
                         f"record in {input_spec}")
    predictor = load_predictor(vault, cohort=cohort)
    notes = predictor.models.warnings() + notes
    result = predict_patient(predictor, index=index, data=data, lime=lime, top=top, seed=seed,
                             lime_samples=lime_samples)
    check = result["attributions"]["forest"]["sum_check"]
    if check["error"] > check["tolerance"]:
        notes.append(f"the forest's SHAP values miss its probability by {check['error']:.3g} (tolerance "
                     f"{check['tolerance']:g}): read them as approximate")
    notes += _global_notes(predictor)
    return {"patient": pid, "vault": str(vault_path), "input": None if input_spec is None else str(input_spec),
            "split": split, "recorded_label": label, "run_id": predictor.models.run_id, **result, "notes": notes,
            "privacy": PRIVACY_NOTE}


def _global_notes(predictor: Any) -> list[str]:
    exp = predictor.explanation
    if not exp:
        return ["this vault holds no global explanation (model/explanation: the run that left these models did not "
                "send one); the comparison with the global explanation is skipped"]
    notes = []
    if exp.get("run_id") and predictor.models.run_id and exp["run_id"] != predictor.models.run_id:
        notes.append(f"the global explanation comes from run {exp['run_id']}, the models from run "
                     f"{predictor.models.run_id}")
    if exp.get("noised"):
        notes.append(f"the global figures are noised (differential privacy, epsilon {exp.get('epsilon', 0):g} per "
                     f"site, over {exp.get('patients', '?')} patients): small differences between them are noise")
    return notes


# ---------------------------------------------------------------------------------------------
# Output


def _num(x: Any) -> str:
    if x is None:
        return "missing"
    if isinstance(x, str):
        return x
    return f"{x:.4g}"


def print_prediction(doc: dict[str, Any]) -> None:
    """The human-readable form of :func:`run_predict`'s document."""
    from rich.console import Console

    # No markup, emoji codes or highlighting: ids and feature names ("variant:1:1106164:A:G") print as they are.
    console = Console(emoji=False, highlight=False, markup=False, soft_wrap=True)
    if not console.is_terminal:  # piped or redirected: no terminal to fit, keep the tables' rows on one line
        console.width = max(console.width, 120)
    where = f"new patient from {doc['input']}" if doc["input"] else f"{doc['split']} split"
    console.print(f"patient {doc['patient']} ({where}); final models of run {doc['run_id']} in {doc['vault']}",
                  style="bold")
    if doc["recorded_label"] is not None:
        console.print(f"recorded outcome: {doc['recorded_label']}")
    if len(doc["classes"]) > 2:
        console.print(f"explanations: of class {doc['explained_output']}, the class the hybrid predicts")
    _print_models(console, doc)
    _print_attributions(console, doc)
    if "lime" in doc:
        _print_lime(console, doc)
    if doc["global"]:
        _print_global(console, doc)
    for note in doc["notes"]:
        console.print(f"note: {note}")
    console.print(doc["privacy"])


def _table(console: Any, title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A heading line, then a table of plain-text cells."""
    from rich.table import Table
    from rich.text import Text

    console.print()
    console.print(title, style="bold")
    table = Table()
    for i, name in enumerate(columns):  # the first column (feature names) is never wrapped
        table.add_column(Text(name), justify="left" if i == 0 else "right", overflow="fold", no_wrap=i == 0)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)


def _print_models(console: Any, doc: dict[str, Any]) -> None:
    classes = doc["classes"]
    rows = [[m, *(f"{row['probabilities'][c]:.3f}" for c in classes),
             f"{row['threshold']:.3f}" if row["threshold"] is not None else "argmax", row["predicted"]]
            for m, row in doc["models"].items()]
    rule = f"threshold on P({classes[-1]})" if len(classes) == 2 else "rule"
    _table(console, "predictions (hybrid: the meta-classifier over the other four)",
           ["model", *(f"P({c})" for c in classes), rule, "predicted"], rows)


def _feature_rows(top: list[dict[str, Any]]) -> list[list[str]]:
    return [[r["feature"], _num(r["value"]), f"{r['contribution']:+.4g}"] for r in top]


FEATURE_COLUMNS = ["feature", "patient's value", "contribution"]


def _print_attributions(console: Any, doc: dict[str, Any]) -> None:
    out = doc["explained_output"]
    f, d = (doc["attributions"][m] for m in ("forest", "cnn"))
    c = f["sum_check"]
    _table(console, f"forest: top features, TreeSHAP on P({out}) (expected value {c['expected_value']:.3f} "
           f"+ contributions {c['contributions']:+.3f} = {c['model_output']:.3f})", FEATURE_COLUMNS,
           _feature_rows(f["top"]))
    for model, name in (("logreg", "federated GLM"), ("site-logreg", "site GLM")):
        if g := doc["attributions"].get(model):
            _table(console, f"{name}: top features, {g['scale']} of {out} (intercept {g['intercept']:+.3f} + "
                   f"contributions {g['score'] - g['intercept']:+.3f} = {g['score']:+.3f})", FEATURE_COLUMNS,
                   _feature_rows(g["top"]))
    for track, rows in d["tracks"].items():
        what = "base" if track == "dna" else "variant"
        _table(console, f"deep model: top positions of track {track}, {d['method']}, {d['scale']} of {out}",
               ["position", what, "attribution"],
               [[str(r["position"]), str(r.get(what, "")), f"{r['attribution']:+.4g}"] for r in rows])
    if "dense" in d:
        _table(console, f"deep model: top tabular features, {d['method']}", FEATURE_COLUMNS, _feature_rows(d["dense"]))


def _print_lime(console: Any, doc: dict[str, Any]) -> None:
    lime = doc["lime"]
    _table(console, f"forest: top features, LIME on P({doc['explained_output']}) ({lime['samples']} samples, "
           f"seed {lime['seed']}, local fit R^2 {lime['local_r2']:.2f})", ["feature", "patient's value", "effect"],
           _feature_rows(lime["top"]))
    console.print(lime["agreement"]["statement"])


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3g}"


def _plain(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _print_global(console: Any, doc: dict[str, Any]) -> None:
    glob = doc["global"]
    unit = glob.get("scaled_to_unit_norm")
    what = ("share: the patient's contribution over the L2 norm of all their attributions for the model, as the "
            "global figures were made; global: mean over the run's explained patients; ratio: |share| / global "
            "mean |share|") if unit else \
        "global: mean over the run's explained patients; ratio: |patient's contribution| / global mean |contribution|"
    size = "share" if unit else "contr."
    for model, part in glob["models"].items():
        rows = [[r["feature"], _num(r["value"]), _signed(r["contribution"]), *([_signed(r["share"])] if unit else []),
                 _plain(r["global_importance"]), _signed(r["global_mean"]), _plain(r["relative"])]
                for r in part["global_top"]]
        _table(console, f"{model}: the run's global top features ({part['scale']}) and this patient ({what})",
               ["feature", "value", "patient", *(["share"] if unit else []), f"global |{size}|", f"global {size}",
                "ratio"], rows)
        console.print(part["statement"])
    for track, rows in glob.get("positions", {}).items():
        _table(console, f"deep model: this patient's top positions of track {track} against the run's global profile",
               ["position", "patient", *(["share"] if unit else []), f"global |{size}|", "ratio"],
               [[str(r["position"]), _signed(r["attribution"]), *([_signed(r["share"])] if unit else []),
                 _plain(r["global_importance"]), _plain(r["relative"])] for r in rows])
